"""The purge task: expired entries deleted in batches and announced as expired."""

import asyncio

import pytest
from channels.layers import get_channel_layer

from contexts import services
from contexts.models import ContextEntry, ContextTag, ContextVersion
from contexts.tasks import purge_expired_contexts

from .conftest import detail_url, expire, if_match, in_db


@pytest.mark.django_db
def test_it_deletes_expired_entries_and_keeps_live_ones(alice, share, as_agent):
    expired = [share(alice, tags=["t"]).json()["context_id"] for _ in range(3)]
    live = share(alice).json()["context_id"]
    as_agent(alice).patch(
        detail_url(expired[0]), {"payload": {}}, format="json", headers=if_match(1)
    )
    for context_id in expired:
        expire(context_id)
    assert purge_expired_contexts() == 3
    assert list(ContextEntry.objects.values_list("id", flat=True)) == [
        ContextEntry.objects.get(pk=live).pk
    ]
    assert not ContextTag.objects.filter(entry_id__in=expired).exists()
    assert not ContextVersion.objects.exists()


@pytest.mark.django_db
def test_it_works_in_batches(alice, share, hub_settings):
    hub_settings(CONTEXT_PURGE_BATCH=2)
    for _ in range(5):
        expire(share(alice).json()["context_id"])
    assert services.contexts_purge_expired(max_batches=1) == 2
    assert ContextEntry.objects.count() == 3
    assert services.contexts_purge_expired() == 3
    assert not ContextEntry.objects.exists()


@pytest.mark.django_db
def test_it_does_nothing_when_nothing_expired(alice, share):
    share(alice)
    assert purge_expired_contexts() == 0
    assert ContextEntry.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("release_db_connections")
async def test_it_announces_each_purged_entry_as_expired(alice, share):
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("ctx.all", channel)
    response = await in_db(share)(alice, context_type="metadata", key="build")
    created = response.json()
    assert (await layer.receive(channel))["event"] == "created"
    await in_db(expire)(created["context_id"])
    assert await in_db(purge_expired_contexts)() == 1
    event = await asyncio.wait_for(layer.receive(channel), 2)
    assert event["type"] == "hub.context"
    assert event["event"] == "expired"
    assert event["route"] == "all"
    assert event["entry"]["context_id"] == created["context_id"]
    assert event["version"] == 1
