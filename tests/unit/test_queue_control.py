"""What ``twisted-mta queue`` does to the queue files: selections by id and
pattern, hold and release, delete and bounce, flush."""

import json
import time

import pytest

from twisted_mta.queue import control
from twisted_mta.queue.control import Selection, wildcard_match
from twisted_mta.queue.store import QueueStore
from twisted_mta.storage.envelope import FAILED, SENT, Envelope

A, B, C = "0000000000001AAAA", "0000000000002BBBB", "0000000000003CCCC"


def queue(directory, queue_id, sender, recipients):
    envelope = Envelope(sender, tuple(recipients), {"ip": "127.0.0.1"}, "7BIT", False)
    (directory / f"{queue_id}.msg").write_bytes(b"Subject: x\n\nbody\n")
    (directory / f"{queue_id}.env").write_bytes(envelope.to_json(queue_id, 17, 0.0))


@pytest.fixture
def store(tmp_path):
    queue(tmp_path, A, "Alice@Example.ORG", ["x@one.test", "y@two.test"])
    queue(tmp_path, B, "bob@example.org", ["z@two.test"])
    queue(tmp_path, C, "", ["postmaster@one.test"])
    control.control_dir(tmp_path).mkdir()  # as a daemon that ran makes it
    return QueueStore(tmp_path)


def ids(results):
    return [m.id for m in results.done]


@pytest.mark.parametrize(
    ("value", "pattern", "expected"),
    [
        ("alice@example.org", "*@example.org", True),
        ("Alice@EXAMPLE.org", "alice@example.ORG", True),
        ("alice@example.org", "*@example.or", False),
        ("alice@example.org", "example.org", False),
        ("alice@example.org", "?lice@*", True),
        ("bob@example.org", "[ab]*@*", True),
        ("carol@example.org", "[ab]*@*", False),
        ("", "", True),
        ("", "*", True),
        ("a@b", "", False),
    ],
)
def test_wildcard_match(value, pattern, expected):
    assert wildcard_match(value, pattern) is expected


def test_selectors_combine_and_recipients_must_be_pending(store):
    def sent(message):
        message.recipients[0].state = SENT

    store.update(A, sent)
    messages = {m.id: m for m in store.messages()}
    assert not Selection(recipient="x@one.test").matches(messages[A])
    assert Selection(recipient="*@two.test").matches(messages[A])
    assert Selection(sender="*@example.org", recipient="*@two.test").matches(messages[B])
    assert not Selection(sender="alice@*", recipient="z@*").matches(messages[B])


def test_a_selection_needs_ids_a_pattern_or_all():
    assert Selection().is_empty()
    assert not Selection(sender="").is_empty()
    assert not Selection(everything=True).is_empty()
    assert not Selection(ids=(A,)).is_empty()


def test_ids_and_patterns_combine(store):
    assert ids(control.delete(store, Selection(ids=(A, B), sender="bob@*"))) == [B]
    assert store.ids() == [A, C]


def test_missing_and_unreadable_ids_are_told_apart(store, tmp_path):
    (tmp_path / f"{C}.env").write_text("{not json")
    results = control.delete(store, Selection(ids=(A, "0000000000009FFFF", "../x", C)))
    assert ids(results) == [A]
    assert results.missing == ["0000000000009FFFF", "../x"]
    assert list(results.unreadable) == [C]


def test_hold_then_release_makes_the_message_due_now(store, tmp_path):
    assert ids(control.hold(store, Selection(recipient="*@TWO.test"))) == [A, B]
    assert [m.held for m in store.messages()] == [True, True, False]
    assert ids(control.hold(store, Selection(everything=True))) == [C]
    flush = control.control_dir(tmp_path) / control.FLUSH_FILE
    flush.unlink()
    before = time.time()
    assert ids(control.release(store, Selection(ids=(A,)))) == [A]
    released = store.load(A)
    assert not released.held
    assert all(r.next_attempt >= before for r in released.recipients)
    assert flush.exists()  # a running daemon rescans


def test_without_a_daemon_ever_started_no_rescan_is_asked(tmp_path):
    control.request_rescan(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_flush_leaves_held_messages_alone(store):
    control.hold(store, Selection(ids=(B,)))
    due_before = store.load(B).recipients[0].next_attempt
    assert ids(control.flush(store)) == [A, C]
    assert store.load(B).recipients[0].next_attempt == due_before


def test_bounce_fails_pending_recipients_of_matching_messages(store):
    assert ids(control.bounce(store, Selection(sender="*@example.org"))) == [A, B]
    states = [[(r.state, r.status) for r in m.recipients] for m in store.messages()]
    assert states[:2] == [[(FAILED, "5.0.0"), (FAILED, "5.0.0")], [(FAILED, "5.0.0")]]
    assert ids(control.bounce(store, Selection(sender="*@example.org"))) == []


def test_results_json_is_one_object_per_message(store):
    results = control.delete(store, Selection(sender=""))
    document = json.loads(control.results_json(results, "deleted"))
    assert document == [{"id": C, "action": "deleted", "sender": ""}]


def test_show_json_has_the_envelope_and_the_message(store, tmp_path):
    (tmp_path / f"{A}.msg").write_bytes(b"Subject: caf\xc3\xa9 \xff\n\nbody\n")
    message = store.load(A)
    document = json.loads(control.show_json(message, control.read_message(store, A)))
    assert document["id"] == A and document["held"] is False
    assert document["message"] == "Subject: caf\u00e9 \ufffd\n\nbody\n"
