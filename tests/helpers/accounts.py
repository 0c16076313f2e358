"""The accounts and aliases most tests run with."""

USERS = """\
alice@example.test:{PLAIN}alice-secret
bob@example.test:{PLAIN}bob-secret
"""

ALIASES = """\
info@example.test: alice@example.test, bob@example.test
sales: bob@example.test
both@example.test: alice@example.test, friend@remote.example
loop1@example.test: loop2@example.test
loop2@example.test: loop1@example.test
"""
