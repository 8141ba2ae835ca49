"""A token bucket: pure, per key, no I/O."""

import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """Allow `rate` events per second on average, with bursts up to `burst`."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float = field(default=0.0)

    def take(self, now: float | None = None, cost: float = 1.0) -> tuple[bool, float]:
        """Spend `cost` tokens; answer (allowed, seconds until it would be allowed)."""
        now = time.monotonic() if now is None else now
        if self.tokens < 0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True, 0.0
        return False, (cost - self.tokens) / self.rate
