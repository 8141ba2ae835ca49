from security.ratelimit import TokenBucket


def test_it_allows_a_burst_then_refuses_with_a_retry_after():
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(now=0.0)[0] for _ in range(3)] == [True, True, True]
    allowed, retry_after = bucket.take(now=0.0)
    assert not allowed
    assert retry_after == 0.1


def test_it_refills_at_the_configured_rate():
    bucket = TokenBucket(rate=10, burst=3)
    for _ in range(3):
        bucket.take(now=0.0)
    assert bucket.take(now=0.05)[0] is False
    assert bucket.take(now=0.2)[0] is True


def test_it_never_holds_more_than_the_burst():
    bucket = TokenBucket(rate=100, burst=2)
    bucket.take(now=0.0)
    results = [bucket.take(now=1000.0)[0] for _ in range(3)]
    assert results == [True, True, False]
