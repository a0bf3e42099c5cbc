//! `--metrics-listen`: the worker's own Prometheus metrics, so a scrape sees its KV cache and
//! sequences without going through a coordinator (which reports the same numbers for all of
//! its workers).

use std::fmt::Write;
use std::time::Duration;

use tessera_coordinator::prometheus::escape;
use tessera_worker::EngineHandle;
use tokio::net::TcpListener;

/// Longest wait for the engine's report: it answers between steps, and a scrape must not hang
/// on a long prefill step.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// What a scrape reads.
#[derive(Clone)]
pub struct WorkerMetrics {
    pub id: String,
    pub engine: EngineHandle,
    pub kv_capacity_tokens: u64,
}

impl WorkerMetrics {
    /// Serves `/metrics` on `listener` until the task is aborted.
    pub async fn serve(self, listener: TcpListener) {
        tessera_coordinator::prometheus::serve_text(listener, move || {
            let metrics = self.clone();
            async move { metrics.render().await }
        })
        .await
    }

    async fn render(&self) -> String {
        let status = tokio::time::timeout(STATUS_TIMEOUT, self.engine.status()).await.ok().and_then(Result::ok);
        let serving = status.as_ref().is_some_and(|s| s.state == "serving");
        let mut out = String::new();
        let id = escape(&self.id);
        for (name, help, value) in [
            ("tessera_worker_serving", "1 while the worker serves a group.", serving),
            (
                "tessera_worker_status_answered",
                "1 if the engine reported within the scrape's time (0: inside a long step).",
                status.is_some(),
            ),
        ] {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{worker=\"{id}\"}} {}\n", u8::from(value));
        }
        // Without a report the KV families would claim zeros: they are left out instead.
        if let Some(s) = status {
            let report = tessera_worker::status_report(&self.id, s, self.kv_capacity_tokens);
            tessera_coordinator::prometheus::render_workers(&mut out, &[tessera_coordinator::cluster::reported(&report)]);
        }
        out
    }
}
