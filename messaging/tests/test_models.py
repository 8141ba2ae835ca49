"""The message log's foreign keys: unchecked by the database, kept by Django (models.py,
NO_CHECK_ON_INSERT)."""

import pytest
from django.db import connection
from django.db.models import ProtectedError

from messaging import batch
from messaging.models import Delivery, Message

from .test_group_commit import outgoing

pytestmark = pytest.mark.django_db(transaction=True)


def foreign_keys(table: str) -> set[str]:
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, table)
    return {
        column for each in constraints.values() if each["foreign_key"] for column in each["columns"]
    }


def test_the_database_checks_no_foreign_key_of_a_message_or_delivery_on_insert():
    assert foreign_keys(Message._meta.db_table) == set()
    assert foreign_keys(Delivery._meta.db_table) == set()


def test_django_still_deletes_a_messages_deliveries_and_protects_its_sender(alice, bob):
    [accepted] = batch.write_batch([outgoing(alice, "bob", "hi")], [], {}).sends
    message = Message.objects.get(pk=accepted.message_id)
    assert Delivery.objects.filter(message=message, recipient=bob.agent).count() == 1
    with pytest.raises(ProtectedError):
        alice.agent.delete()  # it has sent messages
    message.delete()
    assert not Delivery.objects.filter(recipient=bob.agent).exists()
