"""Message ids grow with time (UUID version 7), so indexes take them at their right edge."""

import time
import uuid

import pytest

from messaging import batch, services
from messaging.ids import new_id, new_ids
from messaging.models import Message

from .test_group_commit import outgoing


def test_ids_are_version_7_and_distinct():
    ids = new_ids(1000)
    assert len(set(ids)) == 1000
    assert {(value.version, value.variant) for value in ids} == {(7, uuid.RFC_4122)}


def test_an_id_is_the_uuid_its_number_makes():
    import copy
    import pickle

    for value in new_ids(100):
        same = uuid.UUID(int=value.int)
        assert type(value) is uuid.UUID and value == same and hash(value) == hash(same)
        assert (str(value), value.hex, value.bytes) == (str(same), same.hex, same.bytes)
        assert value.is_safe is same.is_safe
        assert pickle.loads(pickle.dumps(value)) == value  # noqa: S301 (our own bytes)
        assert copy.copy(value) == value
        assert uuid.UUID(str(value)) == value
        with pytest.raises(TypeError):
            value.int = 1  # as immutable as any UUID


def test_ids_carry_the_time_they_were_made_in_their_top_48_bits():
    before = time.time_ns() // 1_000_000
    value = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= value.int >> 80 <= after


def test_a_later_batch_of_ids_sorts_after_an_earlier_one():
    first = new_ids(50)
    time.sleep(0.002)
    second = new_ids(50)
    assert max(first) < min(second)
    assert max(value.hex for value in first) < min(value.hex for value in second)


@pytest.mark.django_db(transaction=True)
def test_stored_messages_sort_by_id_in_the_order_they_were_accepted(alice, bob):
    accepted = []
    for payload in range(3):
        accepted += batch.write_batch([outgoing(alice, "bob", payload)], [], {}).sends
        time.sleep(0.002)
    # The REST path stores one message at a time, with the model's default id.
    accepted.append(services.message_send(sender=alice.agent, kind="direct", payload=3, to="bob"))
    ids = [message.message_id for message in accepted]
    assert all(value.version == 7 for value in ids)
    stored = list(Message.objects.order_by("id").values_list("payload", flat=True))
    assert stored == [0, 1, 2, 3]
