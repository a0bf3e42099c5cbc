//! A collective wrapper that measures the time spent inside collective calls.

use std::time::{Duration, Instant};

use tessera_collective::{Collective, Result};

/// Forwards every call to `inner` and adds up the wall time spent in them. `inner` is `Send`, as
/// every host backend is, so the model's pool may run a pass with it (`Collective::as_send`).
pub struct Timed<'a> {
    pub inner: &'a mut (dyn Collective + Send),
    pub spent: Duration,
    pub calls: u64,
}

impl<'a> Timed<'a> {
    pub fn new(inner: &'a mut (dyn Collective + Send)) -> Self {
        Self { inner, spent: Duration::ZERO, calls: 0 }
    }

    fn time<T>(&mut self, f: impl FnOnce(&mut dyn Collective) -> T) -> T {
        let start = Instant::now();
        let out = f(self.inner);
        self.spent += start.elapsed();
        self.calls += 1;
        out
    }
}

impl Collective for Timed<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.time(|c| c.all_reduce_sum(data))
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        self.time(|c| c.all_gather(local, out))
    }

    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()> {
        self.time(|c| c.send(peer, data))
    }

    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()> {
        self.time(|c| c.recv(peer, out))
    }

    fn as_send(&mut self) -> Option<&mut (dyn Collective + Send)> {
        Some(self)
    }
}
