"""The first promise: a newcomer's message lands in the maildir."""


def test_mail_to_postmaster_lands_in_maildir(mta):
    with mta.smtp() as client:
        client.ehlo("client.example.org")
        refused = client.sendmail(
            "sender@example.org", ["postmaster@example.test"], b"Subject: hi\r\n\r\nhello\r\n"
        )
    assert refused == {}
    [message] = mta.messages("example.test", "postmaster")
    assert message.startswith(b"Return-Path: <sender@example.org>\nDelivered-To: postmaster@example.test\nReceived: from client.example.org ([127.0.0.1])\n")
    assert message.endswith(b"\nSubject: hi\n\nhello\n")
    mta.wait_for_log(r"id=\w+ from=<sender@example.org> size=\d+ nrcpt=1 client=unknown\[127.0.0.1\]")
