//! The Prometheus exposition (`GET /metrics` on the admin listener).
//!
//! A scrape reads each generation's counters (`plugin::stats`) through the [`Collector`]
//! interface of `prometheus-client`, which does the text format, and sums by version: the
//! figures of generations that have left the history are folded into per-version totals first
//! (`history`), so counters never go back.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::control::host::HostProcess;
use crate::control::registry::Registry;
use crate::control::tls::Certificates;
use crate::plugin::reaper::unloads;
use crate::plugin::stats::{Unloaded, BUCKETS};
use crate::plugin::Generation;

/// The `/metrics` collector: reads the registry, the host process and the certificates (if
/// it serves HTTPS) at every scrape.
pub(crate) struct Metrics(pub Arc<Registry>, pub Arc<HostProcess>, pub Option<Arc<Certificates>>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let registry = &self.0;
        let by_version = registry.history().totals_by_version();

        let mut requests = encoder.encode_descriptor(
            "hotswap_requests",
            "Requests answered, by plugin version and status code",
            None,
            MetricType::Counter,
        )?;
        for ((version, status), totals) in &by_version {
            let labels = [("version", version.as_str()), ("status", status.as_str())];
            ConstCounter::new(totals.count).encode(requests.encode_family(&labels)?)?;
        }

        let mut latency = encoder.encode_descriptor(
            "hotswap_request_duration_seconds",
            "Time from a request's arrival until its response head was ready, by plugin version and status code",
            None,
            MetricType::Histogram,
        )?;
        for ((version, status), totals) in &by_version {
            let labels = [("version", version.as_str()), ("status", status.as_str())];
            let buckets: Vec<(f64, u64)> =
                BUCKETS.iter().copied().chain([f64::INFINITY]).zip(totals.buckets).collect();
            latency.encode_family(&labels)?.encode_histogram::<NoLabelSet>(totals.seconds, totals.count, &buckets, None)?;
        }

        let resident = registry.resident();
        let per_generation = [
            (
                "hotswap_in_flight_requests",
                "Requests in progress (until their response body ends), per resident generation",
                (|g| g.in_flight()) as fn(&Generation) -> usize,
            ),
            (
                "hotswap_upgraded_connections",
                "Connections switched to another protocol (WebSockets) that a resident generation serves",
                |g| g.stats().upgraded(),
            ),
        ];
        for (name, help, value) in per_generation {
            let mut gauge = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for generation in &resident {
                let (id, version) = (generation.id().to_string(), generation.version().to_string());
                let labels = [("generation", id.as_str()), ("version", version.as_str())];
                ConstGauge::new(value(generation) as i64).encode(gauge.encode_family(&labels)?)?;
            }
        }

        let resident_generations = crate::plugin::reaper::resident_generations() as i64;
        ConstGauge::new(resident_generations).encode(encoder.encode_descriptor(
            "hotswap_resident_generations",
            "Generations loaded: the current one and those draining",
            None,
            MetricType::Gauge,
        )?)?;

        let events = registry.events();
        ConstCounter::new(events.swaps.load(Ordering::Relaxed)).encode(encoder.encode_descriptor(
            "hotswap_swaps",
            "Swaps: a new generation became current",
            None,
            MetricType::Counter,
        )?)?;

        labelled_counters(
            &mut encoder,
            "hotswap_refusals",
            "Plugin builds refused instead of swapped in, by reason",
            "reason",
            registry.history().refusals_by_reason(),
        )?;
        labelled_counters(
            &mut encoder,
            "hotswap_unloads",
            "Generations unloaded, by result: unmapped (gone from /proc/self/maps), file_mapped (code gone, its file still \
             mapped read-only by a backtrace symbolizer cache), still_mapped (a bug), leaked (threads stuck in plugin code)",
            "result",
            [
                ("unmapped", unloads(Unloaded::Unmapped)),
                ("file_mapped", unloads(Unloaded::DataMapped)),
                ("still_mapped", unloads(Unloaded::StillMapped)),
                ("leaked", unloads(Unloaded::Leaked)),
            ],
        )?;
        labelled_counters(
            &mut encoder,
            "hotswap_aborted_responses",
            "Responses cut off before they ended, by cause: drain_timeout (their generation was replaced longer than --drain-timeout ago), generation_cap (--max-generations)",
            "cause",
            [
                ("drain_timeout", events.aborted_by_drain_timeout.load(Ordering::Relaxed)),
                ("generation_cap", events.aborted_by_generation_cap.load(Ordering::Relaxed)),
            ],
        )?;

        let mut canary = encoder.encode_descriptor(
            "hotswap_canary_percent",
            "The share of new requests the canary gets, while one runs",
            None,
            MetricType::Gauge,
        )?;
        if let Some(progress) = registry.canary_progress() {
            let (id, version) = (progress.generation.id().to_string(), progress.generation.version().to_string());
            let labels = [("generation", id.as_str()), ("version", version.as_str())];
            prometheus_client::metrics::gauge::ConstGauge::new(progress.share.percent()).encode(canary.encode_family(&labels)?)?;
        }
        labelled_counters(
            &mut encoder,
            "hotswap_canaries",
            "Canaries ended, by outcome: promoted, or rolled_back (by their figures or by the operator)",
            "outcome",
            [
                ("promoted", events.canary_promotions.load(Ordering::Relaxed)),
                ("rolled_back", events.canary_rollbacks.load(Ordering::Relaxed)),
            ],
        )?;
        ConstCounter::new(crate::plugin::watchdog::stalls()).encode(encoder.encode_descriptor(
            "hotswap_generation_stalls",
            "Times a generation's worker threads were all found stuck in plugin code for 5 s or more (a blocking call in async code)",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(crate::plugin::stats::replayed_total()).encode(encoder.encode_descriptor(
            "hotswap_canary_replayed_requests",
            "Idempotent requests a canary failed before its response started, answered by the current version instead",
            None,
            MetricType::Counter,
        )?)?;

        // The host process: which binary serves, and what it took over from the one before.
        let host = &self.1;
        let mut info = encoder.encode_descriptor(
            "hotswap_host_info",
            "The host process serving: its hotswap version and pid (always 1)",
            None,
            MetricType::Gauge,
        )?;
        let pid = std::process::id().to_string();
        let labels = [("version", env!("CARGO_PKG_VERSION")), ("pid", pid.as_str())];
        ConstGauge::new(1).encode(info.encode_family(&labels)?)?;
        ConstCounter::new(host.upgrade_count()).encode(encoder.encode_descriptor(
            "hotswap_host_upgrades",
            "Upgrades of the host binary (hotswap upgrade), by this process and those before it",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(host.adopted()).encode(encoder.encode_descriptor(
            "hotswap_host_connections_handed_over",
            "Keep-alive connections this process took over from the one it replaced, without their clients reconnecting",
            None,
            MetricType::Counter,
        )?)?;
        if let Some(certificates) = &self.2 {
            certificate_metrics(&mut encoder, certificates)?;
        }
        Ok(())
    }
}

/// HTTPS: when each certificate expires, and what reloads did.
fn certificate_metrics(encoder: &mut DescriptorEncoder, certificates: &Certificates) -> Result<(), std::fmt::Error> {
    let mut expiry = encoder.encode_descriptor(
        "hotswap_tls_certificate_expiry_seconds",
        "When each certificate that serves HTTPS expires, in seconds since the Unix epoch (alert on it minus time())",
        None,
        MetricType::Gauge,
    )?;
    for cert in certificates.serving() {
        let expires = cert.not_after.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (names, file) = (cert.names.join(","), cert.cert_file.to_string_lossy());
        let labels = [("subject", cert.subject.as_str()), ("names", names.as_str()), ("file", file.as_ref())];
        ConstGauge::new(i64::try_from(expires).unwrap_or(i64::MAX)).encode(expiry.encode_family(&labels)?)?;
    }
    ConstCounter::new(certificates.replaced_count()).encode(encoder.encode_descriptor(
        "hotswap_tls_certificate_replacements",
        "Certificates that began serving in place of another without a restart",
        None,
        MetricType::Counter,
    )?)?;
    let refused = certificates.refused_by_kind();
    labelled_counters(
        encoder,
        "hotswap_tls_certificate_refusals",
        "Certificates refused (the previous one kept serving), by reason: unreadable, invalid, key, mismatch (the key is not the certificate's), expired, not_yet_valid",
        "reason",
        ["unreadable", "invalid", "key", "mismatch", "expired", "not_yet_valid"].map(|kind| (kind, refused.get(kind).copied().unwrap_or(0))),
    )
}

/// A counter family with one label, one series per value of it.
fn labelled_counters<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in series {
        ConstCounter::new(count).encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

/// The text a scrape gets (Prometheus text format 0.0.4).
pub(crate) fn render(registry: &Arc<Registry>, host: &Arc<HostProcess>, certificates: Option<&Arc<Certificates>>) -> String {
    let mut exposition = prometheus_client::registry::Registry::default();
    exposition.register_collector(Box::new(Metrics(registry.clone(), host.clone(), certificates.cloned())));
    let mut text = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a label.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &exposition) {
        tracing::error!("cannot encode the metrics: {e}");
    }
    text
}
