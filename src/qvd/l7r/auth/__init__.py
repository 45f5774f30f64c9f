"""Authentication of L7R requests: credentials parsing, the plugin interface, the chain."""
