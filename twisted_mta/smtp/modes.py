"""What an SMTP session's input means at the moment."""

COMMAND = "command"  # command lines
DATA = "data"  # the message body, up to <CRLF>.<CRLF>
AUTH = "auth"  # SASL responses to a 334 challenge
CLOSED = "closed"  # nothing: the connection is going away
