//! `GET /metrics` in the Prometheus text format (version 0.0.4), on a listener of its own.
//!
//! A scrape reads the same view as `ClusterStatus` (queue, running requests, each worker's KV
//! use, which costs one `Status` RPC per worker) plus the token counters and latency histograms
//! the group loops keep in [`Metrics`](crate::metrics::Metrics). Nothing is computed per token
//! beyond the atomic adds there.

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tessera_proto::v1 as pb;
use tokio::net::TcpListener;

use crate::auth::ApiKeys;
use crate::cluster::Cluster;
use crate::histogram::HistogramSnapshot;
use crate::metrics::TokenMetrics;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on `listener` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, cluster: Arc<Cluster>, keys: Option<Arc<ApiKeys>>) {
    serve_text(listener, move || {
        let (cluster, keys) = (cluster.clone(), keys.clone());
        async move {
            let status = cluster.status().await;
            let serving = *cluster.serving_groups().borrow();
            let mut text = render(&status, &cluster.metrics.token_snapshot(), serving);
            if let Some(keys) = keys {
                text.push_str(&keys.prometheus());
            }
            text
        }
    })
    .await
}

/// Serves `GET /metrics` on `listener`, each scrape answered with the text `scrape` makes,
/// until the task is aborted. Workers serve theirs through this too.
pub async fn serve_text<F, Fut>(listener: TcpListener, scrape: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let scrape = scrape.clone();
                async move { Ok::<_, Infallible>(respond(req, scrape).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn respond<F, Fut>(req: Request<hyper::body::Incoming>, scrape: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let reply = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(CONTENT_TYPE));
        response
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "only /metrics is served here\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    reply(StatusCode::OK, scrape().await)
}

/// The exposition text for one scrape.
pub(crate) fn render(status: &pb::ClusterStatusResponse, tokens: &TokenMetrics, serving_groups: usize) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n");
    };
    gauge(
        &mut out,
        "tessera_queued_requests",
        "Requests waiting to run: queued on a group, or waiting for a group a ring holds.",
        u64::from(status.queued_requests),
    );
    gauge(&mut out, "tessera_running_requests", "Requests a group is running.", u64::from(status.running_requests));
    gauge(&mut out, "tessera_serving_groups", "Worker groups loaded and serving.", serving_groups as u64);
    gauge(&mut out, "tessera_leader", "1 if this coordinator leads the cluster, 0 on a standby.", u64::from(status.leading));
    // The autoscaling signals: per-group averages, so an HPA's `Value` target reads as "per
    // group" and its formula (desired = ceil(groups * value / target)) applies directly.
    let per_group = f64::from(status.queued_requests) / serving_groups.max(1) as f64;
    let _ = write!(
        out,
        "# HELP tessera_queued_requests_per_group Requests waiting to run, per serving group.\n\
         # TYPE tessera_queued_requests_per_group gauge\ntessera_queued_requests_per_group {per_group}\n"
    );
    let _ = write!(
        out,
        "# HELP tessera_kv_utilisation KV tokens held by sequences over the capacity of the workers in groups (0..1).\n\
         # TYPE tessera_kv_utilisation gauge\ntessera_kv_utilisation {}\n",
        kv_utilisation(&status.workers)
    );
    gauge(
        &mut out,
        "tessera_ring_waiting_tokens",
        "KV tokens of long requests waiting for groups to form their ring (scale workers up on it).",
        status.ring_waiting_tokens,
    );
    let refused = status.counters.as_ref().map_or(0, |c| c.capacity_refused_tokens);
    let name = "tessera_capacity_refused_tokens_total";
    let _ = write!(
        out,
        "# HELP {name} KV tokens of requests refused because no group or ring could hold them.\n# TYPE {name} counter\n{name} {refused}\n"
    );

    let counters = status.counters.clone().unwrap_or_default();
    let name = "tessera_requests_finished_total";
    let _ = write!(
        out,
        "# HELP {name} Requests that ended, by reason (CANCELLED: the client left; LOST: its group failed).\n# TYPE {name} counter\n"
    );
    // The protobuf map has no order; scrapes read better with one.
    let finished: std::collections::BTreeMap<_, _> = counters.finished.iter().collect();
    for (reason, n) in finished {
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {n}", escape(reason));
    }
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n");
    };
    counter(&mut out, "tessera_loop_guard_stops_total", "Generations the loop guard stopped.", counters.loop_guard_stops);
    counter(&mut out, "tessera_loop_guard_remedies_total", "Loop-guard remedies applied.", counters.loop_guard_remedies);
    counter(&mut out, "tessera_output_tokens_total", "Tokens sampled for streamed requests.", tokens.output_tokens);
    counter(
        &mut out,
        "tessera_preemptions_total",
        "Sequences preempted (and later recomputed) for want of KV blocks.",
        counters.preemptions,
    );
    counter(
        &mut out,
        "tessera_deadlines_exceeded_total",
        "Requests ended because their gRPC deadline passed.",
        counters.deadlines_exceeded,
    );
    counter(
        &mut out,
        "tessera_migrations_total",
        "Requests moved to another group because theirs was lost mid-request.",
        counters.migrations,
    );
    histogram(
        &mut out,
        "tessera_time_to_first_token_seconds",
        "From a request's arrival to its first sampled token.",
        &tokens.time_to_first_token,
    );
    histogram(
        &mut out,
        "tessera_inter_token_latency_seconds",
        "Between consecutive sampled tokens of a request.",
        &tokens.inter_token_latency,
    );

    render_workers(&mut out, &status.workers);
    out
}

/// KV tokens that sequences hold over the capacity of the workers placed in groups (those
/// with a model); 0 when
/// no worker is.
fn kv_utilisation(workers: &[pb::WorkerStatus]) -> f64 {
    let grouped = workers.iter().filter(|w| !w.model.is_empty());
    let (held, capacity) = grouped.fold((0u64, 0u64), |(h, c), w| (h + w.kv_tokens, c + w.kv_capacity_tokens));
    if capacity == 0 {
        0.0
    } else {
        held as f64 / capacity as f64
    }
}

/// The per-worker families (KV cache, sequences, prefix cache), one sample per worker labelled
/// with its id: what the coordinator reports for all workers and a worker for itself.
pub fn render_workers(out: &mut String, workers: &[pb::WorkerStatus]) {
    type Read = fn(&pb::WorkerStatus) -> u64;
    let per_worker: [(&str, &str, &str, Read); 10] = [
        ("tessera_worker_kv_tokens", "KV cache tokens a worker holds.", "gauge", |w| w.kv_tokens),
        ("tessera_worker_kv_capacity_tokens", "KV cache tokens a worker can hold.", "gauge", |w| w.kv_capacity_tokens),
        ("tessera_worker_kv_blocks", "KV cache blocks (16 tokens each) a worker holds.", "gauge", |w| w.kv_blocks),
        ("tessera_worker_kv_capacity_blocks", "KV cache blocks a worker can hold.", "gauge", |w| w.kv_capacity_blocks),
        ("tessera_worker_sequences", "Sequences a worker holds.", "gauge", |w| u64::from(w.sequences)),
        ("tessera_worker_prefix_cached_blocks", "KV blocks a worker's prefix cache names.", "gauge", |w| w.prefix_cached_blocks),
        ("tessera_worker_prefix_unused_blocks", "Cached KV blocks no sequence uses (evictable).", "gauge", |w| w.prefix_unused_blocks),
        ("tessera_worker_prefix_hits_total", "Prefix cache lookups that reused blocks.", "counter", |w| w.prefix_hits),
        ("tessera_worker_prefix_hit_tokens_total", "Prompt tokens reused from the prefix cache.", "counter", |w| w.prefix_hit_tokens),
        ("tessera_worker_prefix_evictions_total", "Cached KV blocks evicted for room.", "counter", |w| w.prefix_evictions),
    ];
    for (name, help, kind, value) in per_worker {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for w in workers {
            let _ = writeln!(out, "{name}{{worker=\"{}\"}} {}", escape(&w.id), value(w));
        }
    }
}

fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
    for (bound, count) in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = write!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n", h.count, h.sum_seconds, h.count);
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn the_text_has_every_family_with_labels_and_cumulative_buckets() {
        let metrics = Metrics::default();
        let arrived = std::time::Instant::now();
        let first = metrics.token(arrived, None, arrived + std::time::Duration::from_millis(30));
        metrics.token(arrived, Some(first), first + std::time::Duration::from_millis(4));
        metrics.finished(&pb::Finished { reason: pb::FinishReason::Length as i32, ..Default::default() });
        metrics.capacity_refused(5000);
        let waiting = metrics.ring_waiting(3016);
        let status = pb::ClusterStatusResponse {
            workers: vec![pb::WorkerStatus {
                id: "w\"1".into(),
                model: "m".into(),
                kv_tokens: 1024,
                kv_capacity_tokens: 4096,
                sequences: 1,
                prefix_hit_tokens: 992,
                ..Default::default()
            }],
            queued_requests: 2,
            running_requests: 1,
            counters: Some(metrics.snapshot()),
            ring_waiting_tokens: metrics.ring_waiting_tokens(),
            leading: true,
            ..Default::default()
        };
        drop(waiting);
        assert_eq!(metrics.ring_waiting_tokens(), 0, "the gauge drops when the wait ends");
        let text = render(&status, &metrics.token_snapshot(), 1);
        for line in [
            "tessera_queued_requests 2",
            "tessera_running_requests 1",
            "tessera_serving_groups 1",
            "tessera_ring_waiting_tokens 3016",
            "tessera_leader 1",
            "tessera_capacity_refused_tokens_total 5000",
            "tessera_requests_finished_total{reason=\"LENGTH\"} 1",
            "tessera_requests_finished_total{reason=\"CANCELLED\"} 0",
            "tessera_output_tokens_total 2",
            "tessera_time_to_first_token_seconds_bucket{le=\"0.02\"} 0",
            "tessera_time_to_first_token_seconds_bucket{le=\"0.04\"} 1",
            "tessera_time_to_first_token_seconds_count 1",
            "tessera_inter_token_latency_seconds_bucket{le=\"0.005\"} 1",
            "tessera_inter_token_latency_seconds_bucket{le=\"+Inf\"} 1",
            "tessera_worker_kv_tokens{worker=\"w\\\"1\"} 1024",
            "tessera_queued_requests_per_group 2",
            "tessera_kv_utilisation 0.25",
            "# TYPE tessera_worker_prefix_hit_tokens_total counter",
            "tessera_worker_prefix_hit_tokens_total{worker=\"w\\\"1\"} 992",
            "tessera_worker_kv_capacity_tokens{worker=\"w\\\"1\"} 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Every sample belongs to a family declared with # TYPE before it.
        let mut declared = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap_or_default().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap_or_default();
                let family = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
                assert!(declared.iter().any(|d| d == name || d == family), "{l:?} has no # TYPE");
            }
        }
    }
}
