//! GPU-busy time from timestamp queries: every compute pass writes a timestamp at its start
//! and end (where the adapter has `TIMESTAMP_QUERY`), each submit resolves its encoder's
//! queries and maps them back without waiting, and the pass durations add up to the seconds
//! the GPU spent computing: the report sets them against the host's wall time.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Timestamps one query set holds (two per pass).
const QUERIES_PER_SET: u32 = 512;
/// Encoders with passes recorded and not yet submitted, at most.
const MAX_OPEN_ENCODERS: usize = 256;

/// One query set with its resolve and readback buffers.
pub(crate) struct Slot {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Timestamps written so far.
    used: u32,
}

impl Slot {
    fn new(device: &wgpu::Device) -> Self {
        let bytes = QUERIES_PER_SET as u64 * 8;
        Slot {
            set: device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("pass timer"), ty: wgpu::QueryType::Timestamp, count: QUERIES_PER_SET }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor { label: Some("pass timer resolve"), size: bytes, usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC, mapped_at_creation: false }),
            readback: device.create_buffer(&wgpu::BufferDescriptor { label: Some("pass timer readback"), size: bytes, usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false }),
            used: 0,
        }
    }
}

/// Per-encoder query sets and the running total of measured pass time.
pub(crate) struct PassTimer<K> {
    /// Nanoseconds per timestamp tick (`Queue::get_timestamp_period`).
    period: f64,
    open: HashMap<K, Vec<Slot>>,
    free: Vec<Slot>,
    /// Slots whose readback mapping finished, and whether it succeeded (filled by
    /// `map_async` callbacks, drained by `collect`).
    mapped: Arc<Mutex<Vec<(Slot, bool)>>>,
    /// Slots submitted whose mapping has not been reported yet.
    in_flight: usize,
    busy_nanos: f64,
}

impl<K: Hash + Eq> PassTimer<K> {
    pub fn new(period: f32) -> Self {
        PassTimer { period: period as f64, open: HashMap::new(), free: Vec::new(), mapped: Arc::new(Mutex::new(Vec::new())), in_flight: 0, busy_nanos: 0.0 }
    }

    /// The query set and the two indices the next pass of encoder `key` writes.
    pub fn next_pass(&mut self, device: &wgpu::Device, key: K) -> (wgpu::QuerySet, u32) {
        if self.open.len() >= MAX_OPEN_ENCODERS && !self.open.contains_key(&key) {
            // encoders dropped unsubmitted leave entries behind: forget them all (their
            // passes go unmeasured; recorded commands keep the query sets alive)
            self.open.clear();
        }
        let slots = self.open.entry(key).or_default();
        if slots.last().is_none_or(|s| s.used + 2 > QUERIES_PER_SET) {
            slots.push(self.free.pop().unwrap_or_else(|| Slot::new(device)));
        }
        let slot = slots.last_mut().expect("a slot was just pushed");
        let first = slot.used;
        slot.used += 2;
        (slot.set.clone(), first)
    }

    /// Records the resolve of encoder `key`'s queries into `enc` (before it is finished).
    /// Returns what `submitted` maps once the encoder is on the queue.
    pub fn resolve(&mut self, key: &K, enc: &mut wgpu::CommandEncoder) -> Vec<Slot> {
        let slots = self.open.remove(key).unwrap_or_default();
        for s in &slots {
            enc.resolve_query_set(&s.set, 0..s.used, &s.resolve, 0);
            enc.copy_buffer_to_buffer(&s.resolve, 0, &s.readback, 0, s.used as u64 * 8);
        }
        slots
    }

    /// Maps the readbacks of slots just submitted; their callbacks fire when the device
    /// is next polled (any wait or read), never blocking here.
    pub fn submitted(&mut self, slots: Vec<Slot>) {
        for slot in slots {
            let done = self.mapped.clone();
            let readback = slot.readback.clone();
            let bytes = slot.used as u64 * 8;
            self.in_flight += 1;
            let mut slot = Some(slot);
            readback.slice(0..bytes).map_async(wgpu::MapMode::Read, move |r| {
                if let Some(s) = slot.take() {
                    done.lock().unwrap().push((s, r.is_ok()));
                }
            });
        }
    }

    /// Adds the durations of every mapped slot to the total and recycles the slots.
    pub fn collect(&mut self) {
        let ready: Vec<(Slot, bool)> = std::mem::take(&mut *self.mapped.lock().unwrap());
        for (mut s, mapped) in ready {
            self.in_flight -= 1;
            if !mapped {
                // the device failed the mapping (it reports why elsewhere): drop the slot
                continue;
            }
            if let Ok(data) = s.readback.slice(0..s.used as u64 * 8).get_mapped_range() {
                let ticks: &[u64] = bytemuck::cast_slice(&data);
                for pair in ticks.chunks_exact(2) {
                    // a pass whose end reads before its start (a counter reset) counts 0
                    self.busy_nanos += pair[1].saturating_sub(pair[0]) as f64 * self.period;
                }
            }
            s.readback.unmap();
            s.used = 0;
            self.free.push(s);
        }
    }

    /// Seconds of measured pass time so far.
    pub fn busy_seconds(&self) -> f64 {
        self.busy_nanos * 1e-9
    }

    /// Submitted slots whose timestamps are not back yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use crate::gpu::kernels::test_util::options;
    use crate::gpu::matmul;
    use crate::gpu::Gpu;

    /// Where the adapter has timestamp queries (lavapipe does), a run of products is
    /// measured: busy time is positive, grows with the work, stays under the wall time,
    /// and with `settle` nothing is left in flight.
    #[test]
    fn pass_time_is_measured_and_bounded_by_wall_time() {
        let g = Gpu::new(&options()).unwrap();
        let Some(start) = g.gpu_busy_seconds(true) else {
            assert!(!g.features.contains(wgpu::Features::TIMESTAMP_QUERY) || std::env::var(super::super::context::GPU_TIMING_ENV).is_ok());
            return;
        };
        let n = 192;
        let a = g.upload(&vec![0.5f32; n * n]).unwrap();
        let t = std::time::Instant::now();
        let mut busy = Vec::new();
        for reps in [1, 4] {
            let mut enc = g.encoder();
            for _ in 0..reps {
                matmul::matmul(&g, &mut enc, &a, &a, n, n, n).unwrap();
            }
            g.submit(enc);
            busy.push(g.gpu_busy_seconds(true).unwrap());
        }
        let wall = t.elapsed().as_secs_f64();
        let (one, five) = (busy[0] - start, busy[1] - start);
        assert!(one > 0.0 && five > one, "busy {one} then {five}");
        assert!(five <= wall * 1.05, "busy {five} s within {wall} s of wall time");
        assert_eq!(g.timer_in_flight(), 0);
    }
}
