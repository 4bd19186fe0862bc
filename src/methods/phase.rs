//! The phases of a layer's compression, as progress shows them and the report times them,
//! and the clock that charges wall time to them.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::gpu::Gpu;

/// What a compression run is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the dense layer's weights and uploading them.
    Loading,
    /// The statistics forward pass over the calibration states.
    Statistics,
    /// A method's decompositions (SVDs, eigen-decompositions, MPO sweeps).
    Decomposition,
    /// FFN channel scoring and the pruned weights.
    FfnScoring,
    /// Encoding and writing the layer's shard.
    Writing,
    /// Running the calibration states through the compressed layer.
    Propagation,
    /// Re-running the finished layers of an interrupted run (`--resume`).
    Replaying,
    /// A layer the plan drops.
    Dropped,
    /// The layer is finished.
    Done,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Loading => "loading weights",
            Phase::Statistics => "statistics",
            Phase::Decomposition => "decomposition",
            Phase::FfnScoring => "FFN scoring",
            Phase::Writing => "writing",
            Phase::Propagation => "propagating",
            Phase::Replaying => "replaying finished layer",
            Phase::Dropped => "dropped",
            Phase::Done => "done",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Wall seconds per phase, of one layer or of a whole run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseSeconds {
    pub loading: f64,
    pub statistics: f64,
    /// Decomposition time outside host-side linear algebra: GPU products, uploads and
    /// readbacks, and the host waiting for them.
    pub decomposition_gpu: f64,
    /// Host-side linear algebra inside the decompositions (Cholesky factors, triangular
    /// inverses, small eigen-decompositions; an MPO's host SVDs).
    pub decomposition_host: f64,
    pub ffn_scoring: f64,
    pub writing: f64,
    pub propagation: f64,
    /// Replaying finished layers on `--resume`.
    #[serde(default)]
    pub replaying: f64,
    /// Of all the above, the time the host sat blocked waiting for the GPU (reads and
    /// waits): the rest is host-busy time.
    pub blocked_on_gpu: f64,
    /// Seconds the GPU spent in compute passes, from timestamp queries (absent where the
    /// adapter has none). A layer's figure may miss its last passes (their timestamps come
    /// back during the next layer); the run's total is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_busy: Option<f64>,
}

impl PhaseSeconds {
    /// (label, seconds) of each phase, in run order (`blocked_on_gpu` excluded: it overlaps).
    pub fn rows(&self) -> [(&'static str, f64); 8] {
        [
            ("loading weights", self.loading),
            ("statistics forward", self.statistics),
            ("decomposition on the GPU", self.decomposition_gpu),
            ("decomposition on the host", self.decomposition_host),
            ("FFN scoring", self.ffn_scoring),
            ("writing", self.writing),
            ("propagation", self.propagation),
            ("replaying (resume)", self.replaying),
        ]
    }

    /// Sum of the phases (the time the clock saw).
    pub fn total(&self) -> f64 {
        self.rows().iter().map(|r| r.1).sum()
    }

    pub fn add(&mut self, o: &PhaseSeconds) {
        self.loading += o.loading;
        self.statistics += o.statistics;
        self.decomposition_gpu += o.decomposition_gpu;
        self.decomposition_host += o.decomposition_host;
        self.ffn_scoring += o.ffn_scoring;
        self.writing += o.writing;
        self.propagation += o.propagation;
        self.replaying += o.replaying;
        self.blocked_on_gpu += o.blocked_on_gpu;
        self.gpu_busy = match (self.gpu_busy, o.gpu_busy) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
}

/// Charges the wall time between phase switches to the phase that was running, and the
/// host's time blocked on the GPU (the device's own counter) to the total.
pub struct PhaseClock<'a> {
    gpu: &'a Gpu,
    current: Option<Phase>,
    since: Instant,
    blocked_at: f64,
    gpu_busy_at: Option<f64>,
    seconds: PhaseSeconds,
}

impl<'a> PhaseClock<'a> {
    pub fn start(gpu: &'a Gpu) -> Self {
        PhaseClock { gpu, current: None, since: Instant::now(), blocked_at: gpu.blocked_seconds(), gpu_busy_at: gpu.gpu_busy_seconds(false), seconds: PhaseSeconds::default() }
    }

    /// Ends the running phase and starts `phase` (`Dropped`/`Done` stop the clock).
    pub fn enter(&mut self, phase: Phase) {
        let dt = self.since.elapsed().as_secs_f64();
        let s = &mut self.seconds;
        match self.current {
            Some(Phase::Loading) => s.loading += dt,
            Some(Phase::Statistics) => s.statistics += dt,
            Some(Phase::Decomposition) => s.decomposition_gpu += dt,
            Some(Phase::FfnScoring) => s.ffn_scoring += dt,
            Some(Phase::Writing) => s.writing += dt,
            Some(Phase::Propagation) => s.propagation += dt,
            Some(Phase::Replaying) => s.replaying += dt,
            Some(Phase::Dropped | Phase::Done) | None => {}
        }
        self.current = Some(phase);
        self.since = Instant::now();
    }

    /// Moves `host` seconds of decomposition time from the GPU side to the host side (the
    /// method measured its host linear algebra itself).
    pub fn host_linear_algebra(&mut self, host: f64) {
        let host = host.min(self.seconds.decomposition_gpu);
        self.seconds.decomposition_gpu -= host;
        self.seconds.decomposition_host += host;
    }

    /// Stops the clock and returns the seconds charged since `start` (the GPU-busy figure
    /// as far as its timestamps are back).
    pub fn finish(self) -> PhaseSeconds {
        self.stop(false)
    }

    /// `finish`, after waiting for the GPU to finish everything submitted, so the GPU-busy
    /// figure (and every earlier clock's share of it) is complete.
    pub fn finish_settled(self) -> PhaseSeconds {
        self.stop(true)
    }

    fn stop(mut self, settle: bool) -> PhaseSeconds {
        self.enter(Phase::Done);
        let gpu_busy = self.gpu.gpu_busy_seconds(settle);
        self.seconds.blocked_on_gpu = self.gpu.blocked_seconds() - self.blocked_at;
        self.seconds.gpu_busy = gpu_busy.zip(self.gpu_busy_at).map(|(now, at)| now - at);
        self.seconds
    }
}
