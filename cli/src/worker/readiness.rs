//! The worker's readiness on `grpc.health.v1`, under the worker service's name.
//!
//! A worker is ready (`SERVING`) only while its engine serves a group — shard loaded, peers
//! connected — and the process has not withdrawn it (registration lost, draining). Before a
//! coordinator places it in a group, while it is reset or reloading, and after its group failed,
//! it is `NOT_SERVING`: a probe must not count a worker that cannot take a step. The process
//! itself (service `""`) stays `SERVING` for liveness.

use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::WORKER_SERVICE;

/// The process's own say in readiness: closed while the worker is unregistered or draining,
/// whatever its engine serves. Dropping it reports `NOT_SERVING` for good.
pub struct Readiness {
    open: watch::Sender<bool>,
}

impl Readiness {
    /// Reports `NOT_SERVING` for the worker now, then follows `engine` (whether it serves a
    /// group, from `EngineHandle::serving`) and this gate, which starts open.
    pub async fn start(health: HealthReporter, engine: watch::Receiver<bool>) -> Self {
        // Set before the server answers its first check, so no probe sees the service unknown.
        health.set_service_status(WORKER_SERVICE, ServingStatus::NotServing).await;
        let (open, gate) = watch::channel(true);
        tokio::spawn(follow(health, engine, gate));
        Self { open }
    }

    /// Lets the engine's state decide again (registered again).
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// `NOT_SERVING` whatever the engine does (registration lost, draining).
    pub fn close(&self) {
        self.open.send_replace(false);
    }
}

/// Mirrors `engine && gate` into the health service until either side is gone, then reports
/// `NOT_SERVING`.
async fn follow(health: HealthReporter, mut engine: watch::Receiver<bool>, mut gate: watch::Receiver<bool>) {
    loop {
        let ready = *engine.borrow_and_update() && *gate.borrow_and_update();
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        health.set_service_status(WORKER_SERVICE, status).await;
        let changed = tokio::select! {
            r = engine.changed() => r,
            r = gate.changed() => r,
        };
        if changed.is_err() {
            break;
        }
    }
    health.set_service_status(WORKER_SERVICE, ServingStatus::NotServing).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::HealthCheckRequest;

    /// Waits (bounded) until the health service reports `want` for the worker service.
    async fn until(service: &impl Health, want: Wire) {
        let wait = async {
            loop {
                let request = tonic::Request::new(HealthCheckRequest { service: WORKER_SERVICE.into() });
                let status = service.check(request).await.expect("the worker service is known").into_inner().status;
                if status == want as i32 {
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), wait).await.unwrap_or_else(|_| panic!("never {want:?}"));
    }

    #[tokio::test]
    async fn ready_only_while_the_engine_serves_and_the_gate_is_open() {
        let reporter = HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let (engine, serving) = watch::channel(false);
        let readiness = Readiness::start(reporter, serving).await;
        until(&service, Wire::NotServing).await;
        engine.send_replace(true);
        until(&service, Wire::Serving).await;
        readiness.close();
        until(&service, Wire::NotServing).await;
        readiness.open();
        until(&service, Wire::Serving).await;
        engine.send_replace(false);
        until(&service, Wire::NotServing).await;
        engine.send_replace(true);
        until(&service, Wire::Serving).await;
        drop(engine);
        until(&service, Wire::NotServing).await;
    }
}
