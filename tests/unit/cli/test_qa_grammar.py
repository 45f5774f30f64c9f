"""The qa grammar: tokenizer, filter trees, verbs, aliases, typing and error messages."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from qvd.cli.qa_grammar import (
    ACTION_VERBS,
    OBJECTS,
    Command,
    GrammarError,
    TokenKind,
    parse,
    parse_line,
    tokenize,
    verbs_for,
)


def sh(line: str) -> Command:
    """Parse the way a shell would hand the words to qa."""
    return parse(shlex.split(line))


def error_of(line: str) -> str:
    with pytest.raises(GrammarError) as info:
        parse_line(line)
    return str(info.value)


# --- the acceptance examples ----------------------------------------------------------------------

ACCEPTANCE: list[tuple[str, Command]] = [
    ("user new name=alice, password=secret",
     Command("user", {}, "new", {"name": "alice", "password": "secret"})),
    ("vm name=desk1 get", Command("vm", {"name": "desk1"}, "get")),
    ("vm user_name~'%ali%' get name, state",
     Command("vm", {"user_name": {"~": "%ali%"}}, "get", fields=["name", "state"])),
    ("di osf_name=desktop tag default",
     Command("di", {"osf_name": "desktop"}, "tag", {"tags": ["default"]})),
    ("host node1 block", Command("host", {"name": "node1"}, "block")),
    ("user alice del", Command("user", {"name": "alice"}, "del")),
    ("tenant new name=acme", Command("tenant", {}, "new", {"name": "acme"})),
    ("osf new name=desktop, memory=512", Command("osf", {}, "new", {"name": "desktop", "memory": 512})),
    ("di new osf=desktop, disk_image=/path/to/file.tar.gz, version=1.0",
     Command("di", {}, "new", {"osf": "desktop", "disk_image": "/path/to/file.tar.gz", "version": "1.0"})),
    ("di new osf=desktop, file=/path/to/file.tar.gz",
     Command("di", {}, "new", {"osf": "desktop", "disk_image": "/path/to/file.tar.gz"})),
    ("vm new name=desk1, user=alice, osf=desktop",
     Command("vm", {}, "new", {"name": "desk1", "user": "alice", "osf": "desktop"})),
    ("vm desk1 start", Command("vm", {"name": "desk1"}, "start")),
    ("vm desk1 stop", Command("vm", {"name": "desk1"}, "stop")),
    ("vm id=[1:20] block", Command("vm", {"id": {"between": [1, 20]}}, "block")),
    ("vm (state=running; blocked=1) get id",
     Command("vm", {"-or": [{"state": "running"}, {"blocked": 1}]}, "get", fields=["id"])),
    ("config key=l7r.port get", Command("config", {"key": "l7r.port"}, "get")),
    ("config set l7r.auth.plugins=ldap", Command("config", {}, "set", {"l7r.auth.plugins": "ldap"})),
    ("config l7r.port default", Command("config", {"key": "l7r.port"}, "default")),
    ("audit get", Command("audit", {}, "get")),
    ("user get order desc name", Command("user", {}, "get", order=["-name"])),
]


@pytest.mark.parametrize(("line", "expected"), ACCEPTANCE, ids=[line for line, _ in ACCEPTANCE])
def test_acceptance_examples_as_one_string(line: str, expected: Command) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize(("line", "expected"), ACCEPTANCE, ids=[line for line, _ in ACCEPTANCE])
def test_acceptance_examples_split_by_a_shell(line: str, expected: Command) -> None:
    assert sh(line) == expected


def test_one_argument_per_word_without_spaces() -> None:
    # A shell that got `qa vm '(state=running;' 'blocked=1)' get id` hands over these words.
    assert parse(["vm", "(state=running;", "blocked=1)", "get", "id"]) == ACCEPTANCE[14][1]


# --- objects and verbs ----------------------------------------------------------------------------


@pytest.mark.parametrize(("alias", "obj"), [("log", "audit"), ("administrator", "admin"), ("VM", "vm")])
def test_object_aliases(alias: str, obj: str) -> None:
    assert parse_line(f"{alias} get").obj == obj


@pytest.mark.parametrize("obj", OBJECTS)
def test_every_object_lists(obj: str) -> None:
    assert parse_line(f"{obj} get") == Command(obj, {}, "get")


def test_verbs_per_object() -> None:
    assert verbs_for("vm") == (
        "get", "new", "set", "del", "block", "unblock", "start", "stop", "disconnect", "prop", "unprop",
    )
    assert "stop_vms" in verbs_for("host") and "stop" in verbs_for("host")
    assert {"tag", "untag"} <= set(verbs_for("di"))
    assert verbs_for("config") == ("get", "set", "default", "del")
    assert verbs_for("audit") == ("get",)
    assert verbs_for("acl") == ("get",)
    assert "block" not in verbs_for("osf")
    assert "prop" not in verbs_for("tenant")


def test_every_verb_that_changes_objects_is_an_action() -> None:
    # qa refuses an action without a filter; a verb missing from ACTION_VERBS would slip through.
    for obj in OBJECTS:
        for verb in verbs_for(obj):
            assert verb in ("get", "new") or verb in ACTION_VERBS, (obj, verb)


@pytest.mark.parametrize("verb", ["del", "block", "unblock", "start", "stop", "disconnect"])
def test_vm_verbs_without_arguments(verb: str) -> None:
    assert parse_line(f"vm desk1 {verb}") == Command("vm", {"name": "desk1"}, verb)


def test_verbs_are_case_insensitive() -> None:
    assert parse_line("Vm desk1 GET").verb == "get"


def test_host_stop_vms() -> None:
    assert parse_line("host node1 stop_vms") == Command("host", {"name": "node1"}, "stop_vms")


def test_verb_without_filter() -> None:
    assert parse_line("vm block") == Command("vm", {}, "block")


def test_field_named_like_a_verb_is_a_condition() -> None:
    # "stop" is a verb, but followed by an operator it is a field.
    assert parse_line("vm stop=1 get").filters == {"stop": 1}


# --- filters --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "tree"), [
    ("memory=512", {"memory": 512}),
    ("memory!=512", {"memory": {"!=": 512}}),
    ("memory<512", {"memory": {"<": 512}}),
    ("memory>512", {"memory": {">": 512}}),
    ("memory<=512", {"memory": {"<=": 512}}),
    ("memory>=512", {"memory": {">=": 512}}),
    ("name~'desk%'", {"name": {"~": "desk%"}}),
    ("name~desk_", {"name": {"~": "desk_"}}),
    ("memory>-1", {"memory": {">": -1}}),
])
def test_operators(text: str, tree: dict[str, Any]) -> None:
    assert parse_line(f"osf {text} get").filters == tree


def test_in_list() -> None:
    assert parse_line("vm id=[1,2,3] get").filters == {"id": [1, 2, 3]}
    assert parse_line("vm state=[running, starting] get").filters == {"state": ["running", "starting"]}


def test_not_in_list_and_not_between() -> None:
    assert parse_line("vm id!=[1,2] get").filters == {"-not": {"id": [1, 2]}}
    assert parse_line("vm id!=[1:5] get").filters == {"-not": {"id": {"between": [1, 5]}}}


def test_range_of_strings() -> None:
    assert parse_line("vm name=[a:m] get").filters == {"name": {"between": ["a", "m"]}}


def test_and_on_distinct_fields_is_one_object() -> None:
    assert parse_line("vm state=running, user_name~'%ana%' get").filters == {
        "state": "running", "user_name": {"~": "%ana%"},
    }


def test_and_on_the_same_field_keeps_both() -> None:
    assert parse_line("vm id>1, id<9 get").filters == {"-and": [{"id": {">": 1}}, {"id": {"<": 9}}]}


def test_or() -> None:
    assert parse_line("vm name=a; name=b; name=c get").filters == {
        "-or": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
    }


def test_and_binds_tighter_than_or() -> None:
    assert parse_line("vm a=1, b=2; c=3 get").filters == {"-or": [{"a": 1, "b": 2}, {"c": 3}]}


def test_parentheses_group() -> None:
    assert parse_line("vm a=1, (b=2; c=3) get").filters == {
        "-and": [{"a": 1}, {"-or": [{"b": 2}, {"c": 3}]}],
    }


def test_nested_groups_flatten_same_operator() -> None:
    assert parse_line("vm ((a=1; b=2); c=3) get").filters == {"-or": [{"a": 1}, {"b": 2}, {"c": 3}]}
    assert parse_line("vm (a=1, (b=2, c=3)) get").filters == {"a": 1, "b": 2, "c": 3}


def test_not() -> None:
    assert parse_line("vm !blocked=1 get").filters == {"-not": {"blocked": 1}}
    assert parse_line("vm !(state=running; blocked=1) get").filters == {
        "-not": {"-or": [{"state": "running"}, {"blocked": 1}]},
    }
    assert parse_line("vm !!blocked=1 get").filters == {"-not": {"-not": {"blocked": 1}}}


def test_not_and_logical_mix() -> None:
    assert parse_line("vm !(state=running; blocked=1), name~'a%', id!=[1,2] get").filters == {
        "-and": [
            {"-not": {"-or": [{"state": "running"}, {"blocked": 1}]}},
            {"name": {"~": "a%"}},
            {"-not": {"id": [1, 2]}},
        ],
    }


def test_bare_value_is_the_name() -> None:
    assert parse_line("user alice get").filters == {"name": "alice"}
    assert parse_line("user 42 get").filters == {"name": "42"}
    assert parse_line("user 'the boss' get").filters == {"name": "the boss"}


def test_bare_value_combines_with_conditions() -> None:
    assert parse_line("vm desk1, state=running get").filters == {"name": "desk1", "state": "running"}
    assert parse_line("vm desk1; desk2 get").filters == {"-or": [{"name": "desk1"}, {"name": "desk2"}]}


def test_bare_value_may_look_like_a_verb_of_another_object() -> None:
    assert parse_line("user start get").filters == {"name": "start"}
    assert parse_line("osf tag; start get").filters == {"-or": [{"name": "tag"}, {"name": "start"}]}


def test_bare_list() -> None:
    assert parse_line("vm [desk1, desk2] get").filters == {"name": ["desk1", "desk2"]}


def test_bare_value_for_di_is_id_or_version() -> None:
    assert parse_line("di 7 untag testing").filters == {"id": 7}
    assert parse_line("di 1.0 get").filters == {"version": "1.0"}
    assert parse_line("di 2024-01-01 get").filters == {"version": "2024-01-01"}
    assert parse_line("di [1,2] get").filters == {"id": [1, 2]}
    assert parse_line("di [1:4] block").filters == {"id": {"between": [1, 4]}}


def test_bare_value_for_config_is_the_key() -> None:
    assert parse_line("config l7r.port get").filters == {"key": "l7r.port"}


# --- aliases --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alias", "field"), [
    ("user", "user_name"), ("osf", "osf_name"), ("tag", "di_tag"), ("host", "host_name"),
    ("di", "di_version"),
])
def test_vm_filter_aliases(alias: str, field: str) -> None:
    cmd = parse_line(f"vm {alias}=x get {alias} order {alias}")
    assert cmd.filters == {field: "x"}
    assert cmd.fields == [field]
    assert cmd.order == [field]


def test_di_and_host_filter_aliases() -> None:
    assert parse_line("di osf=desktop, name=img.tgz get").filters == {
        "osf_name": "desktop", "disk_image": "img.tgz",
    }
    assert parse_line("host ip_address=10.0.0.5 get").filters == {"address": "10.0.0.5"}


def test_aliases_belong_to_their_object() -> None:
    assert parse_line("user host=x get").filters == {"host": "x"}


def test_new_aliases() -> None:
    assert parse_line("vm new name=d, user_name=alice, osf_name=desktop, tag=testing").args == {
        "name": "d", "user": "alice", "osf": "desktop", "di_tag": "testing",
    }
    assert parse_line("di new osf_name=desktop, name=img.tgz").args == {
        "osf": "desktop", "disk_image": "img.tgz",
    }
    assert parse_line("host new name=node1, ip_address=10.0.0.5").args == {
        "name": "node1", "address": "10.0.0.5",
    }


def test_set_aliases() -> None:
    assert parse_line("vm desk1 set tag=testing").args == {"di_tag": "testing"}


def test_property_keys_are_not_aliased() -> None:
    assert parse_line("vm desk1 prop tag=x").args == {"tag": "x"}


# --- values and typing ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("memory=512", 512),
    ("memory=-3", -3),
    ("memory=0", 0),
    ("ratio=0.5", 0.5),
    ("memory='512'", "512"),
    ('memory="512"', "512"),
    ("code=007", "007"),
    ("overlay=true", True),
    ("overlay=false", False),
    ("description=null", None),
    ("description='null'", "null"),
    ("name=123", "123"),
    ("version=1.10", "1.10"),
    ("password=1234", "1234"),
    ("ip=10.0.0.5", "10.0.0.5"),
    ("description=true", "true"),
    ("expiration_hard=2030-01-01T10:00:00", "2030-01-01T10:00:00"),
    ("disk_image=/srv/img/desk-1.0.tar.gz", "/srv/img/desk-1.0.tar.gz"),
])
def test_scalar_typing(text: str, value: Any) -> None:
    key = text.split("=", 1)[0]
    assert parse_line(f"osf new {text}").args[key] == value


def test_list_values_in_arguments() -> None:
    assert parse_line("di new osf=desktop, disk_image=a.tgz, tags=[default, '2024']").args["tags"] == [
        "default", "2024",
    ]
    assert parse_line("admin new name=bob, password=x, roles=[operator, 'help desk']").args["roles"] == [
        "operator", "help desk",
    ]


def test_quoting() -> None:
    assert parse_line("user new name=x, description='my desk, nice; (really)'").args["description"] == (
        "my desk, nice; (really)"
    )
    assert parse_line('user new name=x, description="it\'s"').args["description"] == "it's"
    assert parse_line(r"user new name=x, description='it\'s \\ ok'").args["description"] == "it's \\ ok"
    assert parse_line("user new name='', password=x").args["name"] == ""


def test_quoted_values_with_spaces_from_a_shell() -> None:
    # The user typed: qa user alice set "description='my desk'"
    assert parse(["user", "alice", "set", "description='my desk'"]).args == {"description": "my desk"}


def test_colon_is_a_word_character_outside_brackets() -> None:
    assert parse_line("vm desk1 set expiration_soft=10:30").args == {"expiration_soft": "10:30"}
    assert parse_line("vm id=[1:3] get").filters == {"id": {"between": [1, 3]}}


# --- verb arguments -------------------------------------------------------------------------------


def test_commas_between_arguments_are_optional() -> None:
    assert parse(["user", "new", "name=alice", "password=secret"]).args == {
        "name": "alice", "password": "secret",
    }
    assert parse_line("vm get name state").fields == ["name", "state"]
    assert parse_line("user new name=alice,").args == {"name": "alice"}
    assert parse_line("vm get name, state,").fields == ["name", "state"]
    assert parse_line("vm get name, order id").fields == ["name"]


def test_get_fields_and_order() -> None:
    cmd = parse_line("vm state=running, user_name~'%ana%' get name, ip, host order desc name, id")
    assert cmd.fields == ["name", "ip", "host_name"]
    assert cmd.order == ["-name", "-id"]


def test_order_ascending() -> None:
    assert parse_line("user get order asc name").order == ["name"]
    assert parse_line("user get order name, id").order == ["name", "id"]


def test_set_and_prop_and_unprop() -> None:
    assert parse_line("vm desk1 set di_tag=testing, expiration_hard='2024-01-01 10:00'").args == {
        "di_tag": "testing", "expiration_hard": "2024-01-01 10:00",
    }
    # Property values are strings, whatever they look like.
    assert parse_line("user alice prop location=Madrid, floor=3").args == {"location": "Madrid", "floor": "3"}
    assert parse_line("user alice unprop location, floor").args == {"keys": ["location", "floor"]}


def test_tag_and_untag() -> None:
    assert parse_line("di osf_name=desktop, version=2023-08-01-000 tag default, head") == Command(
        "di", {"osf_name": "desktop", "version": "2023-08-01-000"}, "tag", {"tags": ["default", "head"]},
    )
    assert parse_line("di id=7 untag testing").args == {"tags": ["testing"]}
    assert parse_line("di 7 tag '2024'").args == {"tags": ["2024"]}


def test_config_set_forms() -> None:
    assert parse_line("config set l7r.port=8443, vm.network.ip.start=10.0.0.10").args == {
        "l7r.port": "8443", "vm.network.ip.start": "10.0.0.10",
    }
    assert parse_line("config set l7r.port=8443, tenant=acme").args == {"l7r.port": "8443", "tenant": "acme"}
    # qa4's form
    assert parse_line("config set key=wat.multitenant, value=1").args == {"wat.multitenant": "1"}
    assert parse_line("config set key=a.b, value=3, tenant=acme").args == {"a.b": "3", "tenant": "acme"}
    # after a filter: set the value of every matching key
    assert parse_line("config key~'l7r.%' set value=1") == Command(
        "config", {"key": {"~": "l7r.%"}}, "set", {"value": "1"},
    )


def test_config_default_and_del() -> None:
    assert parse_line("config key=path.log, tenant=acme default").filters == {
        "key": "path.log", "tenant": "acme",
    }
    assert parse_line("config l7r.port del").verb == "del"


# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_kinds() -> None:
    kinds = [t.kind for t in tokenize(["vm", "!(a<=1;b!=[x,'y z'])", "get"])]
    assert kinds == [
        TokenKind.WORD, TokenKind.BANG, TokenKind.LPAREN, TokenKind.WORD, TokenKind.OP, TokenKind.WORD,
        TokenKind.SEMI, TokenKind.WORD, TokenKind.OP, TokenKind.LBRACKET, TokenKind.WORD, TokenKind.COMMA,
        TokenKind.STRING, TokenKind.RBRACKET, TokenKind.RPAREN, TokenKind.WORD, TokenKind.END,
    ]


def test_tokenizer_keeps_positions() -> None:
    toks = tokenize(["vm", "name=desk1"])
    assert [(t.value, t.arg, t.offset) for t in toks[:4]] == [
        ("vm", 0, 0), ("name", 1, 0), ("=", 1, 4), ("desk1", 1, 5),
    ]


def test_argument_boundaries_separate_words() -> None:
    assert [t.value for t in tokenize(["a", "b"])][:2] == ["a", "b"]


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "message"), [
    ("vm desk1 foo", "syntax error at 'foo': expected a verb (get, new, set, del, block, unblock, start"),
    ("vm desk1", "syntax error at end of command: expected a verb (get, new,"),
    ("vm", "syntax error at end of command: expected a filter or a verb"),
    ("", "syntax error at end of command: expected an object (vm, user, host"),
    ("desk get", "syntax error at 'desk': expected an object"),
    # "get" is the value here (a VM may be called so), so the verb is missing.
    ("vm name= get", "syntax error at end of command: expected a verb"),
    ("vm name=", "syntax error at end of command: expected a value after 'name='"),
    ("vm (name=a get", "syntax error at 'get': expected ')'"),
    ("vm name=a) get", "syntax error at ')': expected a verb"),
    ("vm id=[1,2 get", "syntax error at 'get': expected ',' or ']' in the list"),
    ("vm id=[] get", "syntax error at ']': expected a value: an empty list"),
    ("vm id=[1:] get", "syntax error at ']': expected the upper bound of the range"),
    ("vm id=[1:2,3] get", "syntax error at ',': expected ']' to close the range"),
    ("vm id<[1,2] get", "syntax error at '<': operator '<' takes a single value"),
    ("vm name~[a,b] get", "operator '~' takes a single value"),
    ("vm name='desk get", "syntax error at ''desk get': unterminated ' quote"),
    ("vm 5=3 get", "syntax error at '5': expected a field name"),
    ("vm name=a, get", "syntax error at 'get': expected a condition after ','"),
    ("vm name=a; get", "expected a condition after ';'"),
    ("vm , get", "syntax error at ',': expected a condition"),
    ("vm name=desk1 new name=x", "syntax error at 'name': 'new' takes no filter"),
    ("user new", "syntax error at end of command: expected key=value after 'new'"),
    ("user new name", "syntax error at end of command: expected '=' after 'name'"),
    ("user new name=alice password", "expected '=' after 'password'"),
    ("user new name>alice", "syntax error at '>': only '=' assigns a value here"),
    ("user new name=a, name=b", "syntax error at 'name': 'name' is given twice"),
    ("user new name=a, memory=[1:2]", "a range only makes sense in a filter"),
    ("user alice prop location=[a,b]", "a property value is a single string"),
    ("user alice del now", "syntax error at 'now': 'del' takes no arguments"),
    ("user alice del order name", "syntax error at 'order': 'order' only goes after 'get'"),
    ("user get order", "syntax error at end of command: expected a field to order by"),
    ("user get order name desc", "syntax error at 'desc': asc/desc goes right after 'order'"),
    ("user get name, 'x'", "syntax error at ''x'': expected a field after ','"),
    ("user get name 'x'", "syntax error at ''x'': expected ',' and another name, or 'order'"),
    ("di 1 tag", "syntax error at end of command: expected a tag"),
    ("user alice unprop", "expected a property key"),
    ("audit new name=x", "syntax error at 'new': 'new' is not a verb of audit; expected a verb (get)"),
    ("osf desktop block now", "syntax error at 'block': expected a verb (get, new, set, del, prop, unprop)"),
    ("osf desktop block", "syntax error at 'block': expected a verb (get, new, set, del, prop, unprop)"),
    ("config set", "expected key=value after 'set'"),
    ("config set l7r.port", "expected '=' after 'l7r.port'"),
    ("config set plugins=[a,b]", "a config value is a single string"),
    ("config l7r.port set a.b=1", "after a filter, config set takes only value="),
    ("config l7r.port set tenant=acme", "expected value=... after set"),
    ("config set tenant=acme", "expected key=value after set"),
    ("config set key=a, value=b, c=d", "unexpected c after key=..., value=..."),
])
def test_syntax_errors(line: str, message: str) -> None:
    assert message in error_of(line)


def test_error_carries_the_token() -> None:
    with pytest.raises(GrammarError) as info:
        parse(["vm", "desk1", "foo"])
    assert info.value.token is not None
    assert (info.value.token.value, info.value.token.arg) == ("foo", 2)
