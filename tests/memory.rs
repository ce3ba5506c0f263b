//! Buffers are allocated once and reused: memory does not grow over 100 cycles, on the CPU
//! (counted by a tracking allocator) and on the GPU (counted device buffers).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use enff::backend::cpu::Cpu;
use enff::experiment::{preset, Experiment};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn experiment(d: usize, cycles: usize, integrator: &str) -> Experiment {
    let p = preset("lorenz96_bao2024").unwrap();
    let mut cfg = p.config.clone();
    for s in [
        format!("model.d={d}"),
        format!("experiment.cycles={cycles}"),
        "experiment.burn_in=1".to_string(),
        "experiment.spinup=50".to_string(),
        "filter.flow_steps=4".to_string(),
        format!("filter.integrator={integrator}"),
    ] {
        cfg.set(&s).unwrap();
    }
    Experiment::new(p.name, cfg, None).unwrap()
}

#[test]
fn cpu_memory_does_not_grow_over_100_cycles() {
    // The heap count is process-wide: keep the GPU test of this binary from overlapping.
    let _guard = common::gpu_lock();
    for integrator in ["euler", "heun"] {
        let exp = experiment(2000, 100, integrator);
        let cpu = Cpu::new();
        let mut live = Vec::with_capacity(101);
        exp.run(&cpu, |_| live.push(LIVE.load(Ordering::Relaxed)))
            .unwrap();
        // After the first cycles (workspace and scratch allocated once), the live heap is flat.
        let after_warmup = live[2];
        let max_later = *live[2..].iter().max().unwrap();
        assert!(
            max_later - after_warmup < 4096,
            "{integrator}: live heap grew from {after_warmup} to {max_later} bytes over 100 cycles"
        );
    }
}

#[test]
fn gpu_buffers_are_not_reallocated_over_100_cycles() {
    let Some((_lock, g)) = common::gpu() else {
        return;
    };
    let exp = experiment(64, 100, "euler");
    let mut counts = Vec::with_capacity(101);
    exp.run(g, |_| counts.push(g.buffers_allocated())).unwrap();
    assert_eq!(
        counts[1],
        counts[99],
        "device buffers allocated after cycle 2: {:?}",
        &counts[..5]
    );
}
