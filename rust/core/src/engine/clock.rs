//! The engine's notion of time, injected so that the simulator runs on virtual time and the real
//! engine on the wall clock, through the same step loop.

use std::time::Instant;

pub trait Clock: Send {
    /// Seconds since the clock started.
    fn now(&self) -> f64;
    /// A step took `dt` seconds of executor time. Virtual clocks move; the wall clock already did.
    fn advance(&mut self, dt: f64);
    /// Nothing to do until `t` (simulation only: the wall clock does not jump).
    fn advance_to(&mut self, t: f64);
}

#[derive(Debug, Clone, Default)]
pub struct VirtualClock {
    now: f64,
}

impl Clock for VirtualClock {
    fn now(&self) -> f64 {
        self.now
    }
    fn advance(&mut self, dt: f64) {
        self.now += dt.max(0.0);
    }
    fn advance_to(&mut self, t: f64) {
        self.now = self.now.max(t);
    }
}

#[derive(Debug, Clone)]
pub struct WallClock {
    start: Instant,
}

impl Default for WallClock {
    fn default() -> Self {
        Self { start: Instant::now() }
    }
}

impl Clock for WallClock {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
    fn advance(&mut self, _dt: f64) {}
    fn advance_to(&mut self, _t: f64) {}
}
