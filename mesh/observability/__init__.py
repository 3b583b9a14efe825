"""What the components tell operators about themselves: Prometheus metrics (``metrics``).

The catalogue of metrics, with their names, labels and meanings, is ``docs/metrics.md``.
"""
