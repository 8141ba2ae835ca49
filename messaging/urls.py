from django.urls import path

from . import views

urlpatterns = [
    path("messages/", views.MessageSendView.as_view(), name="message-send"),
    path("messages/inbox/", views.InboxView.as_view(), name="message-inbox"),
    path("messages/ack/", views.AckView.as_view(), name="message-ack"),
    path("messages/<uuid:message_id>/", views.MessageDetailView.as_view(), name="message-detail"),
]
