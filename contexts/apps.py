from django.apps import AppConfig


class ContextsConfig(AppConfig):
    name = "contexts"
    verbose_name = "Shared context"

    def ready(self):
        from messaging.protocol import register_frame_type

        from . import protocol

        # The agent socket learns the watch frames here rather than at import time (STYLE).
        for name, validator in protocol.FRAME_VALIDATORS.items():
            register_frame_type(name, validator)
