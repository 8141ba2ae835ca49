import pytest
from channels.testing import WebsocketCommunicator

from mcp_project.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


async def connect(credentials):
    communicator = WebsocketCommunicator(application, "/ws/agent/", headers=credentials.ws_headers)
    connected, _ = await communicator.connect()
    assert connected
    welcome = await communicator.receive_json_from()
    assert welcome["type"] == "welcome"
    return communicator, welcome


async def test_it_routes_a_direct_message_between_two_agents(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await a.send_json_to({"type": "send", "to": "bob", "payload": {"n": 1}, "ref": "r1"})
    accepted = await a.receive_json_from()
    assert accepted["type"] == "accepted" and accepted["ref"] == "r1"
    message = await b.receive_json_from()
    assert message["from"] == "alice" and message["payload"] == {"n": 1} and message["seq"] == 1
    await a.disconnect()
    await b.disconnect()
