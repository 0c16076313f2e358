"""The queue envelope's JSON: what is written is read back, old files too."""

import json

from twisted_mta.storage.envelope import ENVELOPE_VERSION, Envelope, QueuedMessage


def stored(**changes):
    envelope = Envelope("s@example.org", ("a@one.test",), {"ip": "127.0.0.1"}, "7BIT", False)
    message = QueuedMessage.from_json(envelope.to_json("0000000000001AAAA", 17, 10.0))
    for name, value in changes.items():
        setattr(message, name, value)
    return message


def test_held_flag_round_trips():
    assert QueuedMessage.from_json(stored(held=True).to_json()).held is True
    assert QueuedMessage.from_json(stored().to_json()).held is False


def test_envelope_written_before_the_held_flag_loads_as_not_held():
    document = json.loads(stored().to_json())
    del document["held"]
    message = QueuedMessage.from_json(json.dumps(document).encode())
    assert (message.held, message.version) == (False, ENVELOPE_VERSION)
    assert message.recipients[0].address == "a@one.test"


def test_new_envelopes_keep_version_1():
    assert json.loads(stored(held=True).to_json())["version"] == 1
