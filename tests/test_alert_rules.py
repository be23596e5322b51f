"""The Prometheus alert rules shipped in docs/prometheus-alerts.yml (issue 12).

``promtool check rules`` must pass, and ``promtool test rules`` runs unit tests of each
alert against made-up series: it fires when it should, with its labels, and stays quiet
when it should. Every metric name the rules use exists in the monitor's exposition.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from converter.monitor.prometheus import metric_names

RULES = Path(__file__).resolve().parents[1] / "docs" / "prometheus-alerts.yml"

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is missing"
)

UNIT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'litefleet_device_online{{device="pi-a"}}'
        values: '0x20'
      - series: 'litefleet_device_online{{device="pi-b"}}'
        values: '1x20'
      - series: 'litefleet_device_stale{{device="pi-b"}}'
        values: '0 0 1x10'
      - series: 'litefleet_device_events_total{{device="pi-a",event="rolled_back",reason="inference_errors"}}'
        values: '0 0 0 1 1 1 1 1 1 1'
      - series: 'litefleet_device_events_total{{device="pi-b",event="rejected",reason="golden"}}'
        values: '0x9'
      - series: 'litefleet_device_metrics_queue_dropped_total{{device="pi-a"}}'
        values: '0 0 5 9'
      - series: 'litefleet_device_uplink_events_dropped_total{{device="pi-b",site="b"}}'
        values: '0 0 0 0x3 40'
      - series: 'litefleet_repo_metadata_expiry_timestamp_seconds{{role="timestamp"}}'
        values: '172800x10'
      - series: 'litefleet_repo_metadata_expiry_timestamp_seconds{{role="root"}}'
        values: '31536000x10'
      - series: 'litefleet_monitor_broker_connected'
        values: '1 1 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 10m
        alertname: LitefleetDeviceOffline
        exp_alerts: []
      - eval_time: 16m
        alertname: LitefleetDeviceOffline
        exp_alerts:
          - exp_labels: {{severity: warning, device: pi-a}}
            exp_annotations:
              summary: litefleet device pi-a is offline
              description: >-
                Its retained state has said offline for 15 minutes (it stopped, or its will
                message was sent: power or network lost). It serves nothing over MQTT and
                takes no new model until it is back. A retired device: `litefleet device
                remove ID --secure DIR` clears it.
      - eval_time: 8m
        alertname: LitefleetDeviceStale
        exp_alerts:
          - exp_labels: {{severity: warning, device: pi-b}}
            exp_annotations:
              summary: litefleet device pi-b says online but sends nothing
              description: >-
                No message for 3 metrics intervals although its state says online: the agent
                hangs, or the link dropped without the broker noticing yet.
      - eval_time: 5m
        alertname: LitefleetModelRolledBack
        exp_alerts:
          - exp_labels: {{severity: critical, device: pi-a, event: rolled_back, reason: inference_errors}}
            exp_annotations:
              summary: pi-a rolled a model back (inference_errors)
              description: >-
                A new model failed on the device after activation (inference errors in its
                trial, or it crashed the agent) and the previous version serves again. The
                release is refused there for good: push a fixed version.
      - eval_time: 5m
        alertname: LitefleetModelRejected
        exp_alerts: []
      - eval_time: 3m
        alertname: LitefleetMetricsQueueDropping
        exp_alerts:
          - exp_labels: {{severity: warning, device: pi-a}}
            exp_annotations:
              summary: "pi-a drops metrics: its offline queue is full"
              description: >-
                The device was cut off from the broker long enough to fill its on-disk queue
                (metrics_queue_max_rows) and now drops the oldest metrics.
      - eval_time: 5m
        alertname: LitefleetSiteUplinkEventsDropped
        exp_alerts: []
      - eval_time: 7m
        alertname: LitefleetSiteUplinkEventsDropped
        exp_alerts:
          - exp_labels: {{severity: warning, device: pi-b, site: b}}
            exp_annotations:
              summary: "pi-b dropped events while site b was cut off"
              description: >-
                The site's uplink to central was down long enough for the device to hold more
                than 1,000 events; the oldest are gone (its metrics wait on disk, its
                retained state is current). See docs/sites.md, Outages.
      # the timestamp expires at 2 days after the epoch: within 3 days from the start
      - eval_time: 1m
        alertname: LitefleetTimestampExpiresSoon
        exp_alerts:
          - exp_labels: {{severity: warning, role: timestamp}}
            exp_annotations:
              summary: the repository's timestamp expires in less than 3 days
              description: >-
                Devices refuse expired metadata and stop taking updates. Run `litefleet repo
                resign DIR --broker ...` on the host (from a timer, well inside the expiry).
      - eval_time: 5m
        alertname: LitefleetRepositoryExpired
        exp_alerts: []
      - eval_time: 1m
        alertname: LitefleetBrokerUnreachable
        exp_alerts: []
      - eval_time: 5m
        alertname: LitefleetBrokerUnreachable
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: the litefleet monitor cannot reach the broker
              description: >-
                Devices may be serving fine, but nothing they report arrives, and nothing can
                be pushed from here either. Is `litefleet broker` (or your broker) running?

  - interval: 1m
    input_series:
      # devices online (then stale: silent) and the collector's message counter stops moving
      - series: 'litefleet_devices{{health="online"}}'
        values: '2 2 2 0x20'
      - series: 'litefleet_devices{{health="stale"}}'
        values: '0 0 0 2x20'
      - series: 'litefleet_monitor_messages_total{{kind="metrics"}}'
        values: '10 20 30 30x20'
      # a site's status every 5 s is not a device speaking
      - series: 'litefleet_monitor_messages_total{{kind="sites"}}'
        values: '0+12x23'
      - series: 'litefleet_monitor_dropped_total'
        values: '0x20'
    alert_rule_test:
      - eval_time: 4m
        alertname: LitefleetNoMessages
        exp_alerts: []
      - eval_time: 14m
        alertname: LitefleetNoMessages
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: the litefleet monitor received nothing for 10 minutes
              description: >-
                Devices were online (or stale: said online, went silent) and send metrics
                every few seconds, yet no message arrived: the broker is unreachable from
                the monitor, or every device stopped.
      - eval_time: 14m
        alertname: LitefleetMonitorDropping
        exp_alerts: []

  # as the monitor exports it: a device's first rollback creates the series, at 1
  - interval: 1m
    input_series:
      - series: 'litefleet_device_events_total{{device="pi-c",event="rolled_back",reason="crash_loop"}}'
        values: '_x5 1x60'
      - series: 'litefleet_device_events_total{{device="pi-c",event="rejected",reason="golden"}}'
        values: '_x5 1x60'
      - series: 'litefleet_model_refused{{device="pi-c",model="digits",version="4",reason="golden"}}'
        values: '_x5 1x80'
    alert_rule_test:
      - eval_time: 4m
        alertname: LitefleetModelRolledBack
        exp_alerts: []
      - eval_time: 7m
        alertname: LitefleetModelRolledBack
        exp_alerts:
          - exp_labels: {{severity: critical, device: pi-c, event: rolled_back, reason: crash_loop}}
            exp_annotations:
              summary: pi-c rolled a model back (crash_loop)
              description: >-
                A new model failed on the device after activation (inference errors in its
                trial, or it crashed the agent) and the previous version serves again. The
                release is refused there for good: push a fixed version.
      - eval_time: 7m
        alertname: LitefleetModelRejected
        exp_alerts:
          - exp_labels: {{severity: warning, device: pi-c, event: rejected, reason: golden}}
            exp_annotations:
              summary: pi-c refused a release or the repository (golden)
              description: >-
                The device keeps serving what it had. Reasons are in docs/protocol.md 6.3:
                golden/signature/load mean the model itself; expired means run `litefleet
                repo resign`; bad_signature/rollback/mismatch mean someone else publishes
                on the broker.
      # 30 minutes on, nothing new: quiet again
      - eval_time: 40m
        alertname: LitefleetModelRolledBack
        exp_alerts: []
      # still behind after an hour: this one stays
      - eval_time: 60m
        alertname: LitefleetModelStillRefused
        exp_alerts: []
      - eval_time: 70m
        alertname: LitefleetModelStillRefused
        exp_alerts:
          - exp_labels: {{severity: warning, device: pi-c, model: digits, version: "4", reason: golden}}
            exp_annotations:
              summary: pi-c refused digits v4 (golden) and still runs an older one
              description: >-
                The rejected or rolled-back alert went quiet 30 minutes after the refusal; the
                device is still behind. It never takes a release it refused: push a fixed
                version (a new one), or keep the fleet on the version it runs.

  # a long way from expiry: quiet; past it: the critical one, for each role
  - interval: 1d
    input_series:
      - series: 'litefleet_repo_metadata_expiry_timestamp_seconds{{role="timestamp"}}'
        values: '1209600x30'
    alert_rule_test:
      - eval_time: 1d
        alertname: LitefleetTimestampExpiresSoon
        exp_alerts: []
      - eval_time: 15d
        alertname: LitefleetRepositoryExpired
        exp_alerts:
          - exp_labels: {{severity: critical, role: timestamp}}
            exp_annotations:
              summary: the repository's timestamp metadata has expired
              description: >-
                Every device refuses the repository (reason expired) and keeps its model.
                Run `litefleet repo resign DIR --broker ...` (root: with --root-keys DIR).
"""


def test_rules_pass_promtool_check() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_rules_fire_and_stay_quiet_as_their_unit_tests_say(tmp_path: Path) -> None:
    tests = tmp_path / "litefleet-alerts.test.yml"
    tests.write_text(UNIT_TESTS.format(rules=RULES))
    out = subprocess.run(
        ["promtool", "test", "rules", str(tests)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_rules_use_only_series_the_monitor_exports() -> None:
    used = set(re.findall(r"\blitefleet_[a-z_]+", RULES.read_text().split("groups:", 1)[1]))
    assert used and used <= set(metric_names()), used - set(metric_names())
    alerts_doc = (RULES.parent / "alerts.md").read_text()
    assert all(f"`{name}`" in alerts_doc for name in used), used
