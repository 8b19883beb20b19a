"""The command line: one function per --mode."""
