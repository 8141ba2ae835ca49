from django.db import models


class SweepRun(models.Model):
    """The last run of one periodic task and the running totals of what its runs reported.

    Written by the Celery worker after each run, read by the dashboard, /metrics and hub_status:
    the worker's own Prometheus registry is not scraped, so the database carries its figures.
    """

    name = models.CharField(max_length=200, unique=True)
    last_run_at = models.DateTimeField()
    last_duration_seconds = models.FloatField(default=0)
    # Numbers the task returned, as {"field": number}; a bare number is stored as {"count": n}.
    last_result = models.JSONField(default=dict, blank=True)
    last_error = models.TextField(blank=True)
    runs = models.PositiveBigIntegerField(default=0)
    failures = models.PositiveBigIntegerField(default=0)
    # Sum of each numeric field over every run, so counters survive worker restarts.
    totals = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def get_status(self, *, now, interval_seconds: float) -> str:
        """Derive freshness: a sweep silent for three intervals is overdue (beat or worker down)."""
        if self.last_error:
            return "failed"
        if (now - self.last_run_at).total_seconds() > 3 * interval_seconds:
            return "overdue"
        return "ok"
