//! The MPI [`Comm`] (cargo feature `mpi`, the rsmpi bindings to the system MPI library).
//!
//! [`MpiWorld::init`] starts MPI when the process was started by an MPI launcher (`mpirun`,
//! `mpiexec`, `srun` …), checks that the library sees the world the launcher started (a
//! launcher from another MPI library starts `N` unrelated one-rank copies instead), and installs
//! a panic hook that aborts the whole job, so a panic on one rank cannot leave the others
//! waiting in a collective. Dropping the [`MpiWorld`] finalizes MPI.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

use super::{launched_size, Comm};
use crate::error::{Error, Result};

/// An initialized MPI library; finalizes MPI when dropped.
pub struct MpiWorld {
    comm: Arc<MpiComm>,
    // Dropped last: MPI_Finalize.
    _universe: mpi::environment::Universe,
}

impl MpiWorld {
    /// Starts MPI if this process was started by an MPI launcher; `Ok(None)` otherwise.
    ///
    /// Fails when the launcher announced `N` processes but the MPI library sees a world of a
    /// different size (a launcher from another MPI implementation).
    pub fn init() -> Result<Option<MpiWorld>> {
        let Some(expected) = launched_size() else {
            return Ok(None);
        };
        let (universe, _provided) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Distributed {
                ranks: expected,
                what: "MPI was already initialized".into(),
                fix: "initialize MPI once per process".into(),
            })?;
        install_abort_on_panic();
        let world = universe.world();
        let size = world.size() as usize;
        let comm = Arc::new(MpiComm {
            world,
            nanos: AtomicU64::new(0),
        });
        let world = MpiWorld {
            comm,
            _universe: universe,
        };
        if expected > 0 && size != expected {
            return Err(Error::Distributed {
                ranks: expected,
                what: format!(
                    "the launcher started {expected} processes but the MPI library sees a world \
                     of {size}: each process runs alone (a launcher from another MPI library \
                     than the one enff was built with)"
                ),
                fix: "start enff with the mpirun of the MPI library it was built against \
                      (Debian: openmpi-bin for libopenmpi-dev)"
                    .into(),
            });
        }
        Ok(Some(world))
    }

    /// The communicator of all ranks.
    pub fn comm(&self) -> Arc<MpiComm> {
        self.comm.clone()
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Ends the whole job at once (every rank) with `code`.
    pub fn abort(&self, code: i32) -> ! {
        self.comm.world.abort(code)
    }
}

/// Aborts the whole MPI job when any thread of this rank panics (after the usual message),
/// instead of leaving the other ranks waiting in a collective for ever.
fn install_abort_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        eprintln!("error: a panic on this MPI rank; aborting the whole job");
        if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
            SimpleCommunicator::world().abort(101);
        }
        std::process::abort();
    }));
}

/// [`Comm`] over `MPI_COMM_WORLD`.
pub struct MpiComm {
    world: SimpleCommunicator,
    nanos: AtomicU64,
}

// SAFETY: MPI is initialized with MPI_THREAD_FUNNELED and enff calls the communicator only
// from the thread that runs the experiment (the main thread); the handle itself is a plain
// identifier of MPI_COMM_WORLD, valid until MPI_Finalize, which runs after the last use.
unsafe impl Send for MpiComm {}
// SAFETY: see `Send` above: no two threads use the communicator at the same time.
unsafe impl Sync for MpiComm {}

impl MpiComm {
    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let v = f();
        self.nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        v
    }

    fn neighbours(&self) -> (i32, i32) {
        let (rank, size) = (self.world.rank(), self.world.size());
        ((rank + size - 1) % size, (rank + 1) % size)
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.timed(|| {
            let send = values.to_vec();
            self.world
                .all_reduce_into(&send[..], values, SystemOperation::sum());
        });
        Ok(())
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.timed(|| {
            let send = values.to_vec();
            self.world
                .all_reduce_into(&send[..], values, SystemOperation::sum());
        });
        Ok(())
    }

    fn max_u64(&self, values: &mut [u64]) -> Result<()> {
        self.timed(|| {
            let send = values.to_vec();
            self.world
                .all_reduce_into(&send[..], values, SystemOperation::max());
        });
        Ok(())
    }

    fn exchange(
        &self,
        to_left: &[f32],
        to_right: &[f32],
        from_left: &mut [f32],
        from_right: &mut [f32],
    ) -> Result<()> {
        let (left, right) = self.neighbours();
        self.timed(|| {
            // Rightward shift, then leftward; distinct tags keep them apart when the left and
            // right neighbour are the same rank (two ranks).
            mpi::point_to_point::send_receive_into_with_tags(
                to_right,
                &self.world.process_at_rank(right),
                1,
                from_left,
                &self.world.process_at_rank(left),
                1,
            );
            mpi::point_to_point::send_receive_into_with_tags(
                to_left,
                &self.world.process_at_rank(left),
                2,
                from_right,
                &self.world.process_at_rank(right),
                2,
            );
        });
        Ok(())
    }

    fn gather_lines(&self, line: &str) -> Result<Vec<String>> {
        const WIDTH: usize = 512;
        let mut mine = [0u8; WIDTH];
        let bytes = line.as_bytes();
        let mut cut = bytes.len().min(WIDTH);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        mine[..cut].copy_from_slice(&bytes[..cut]);
        let mut all = vec![0u8; WIDTH * self.size()];
        self.timed(|| self.world.all_gather_into(&mine[..], &mut all[..]));
        if self.rank() != 0 {
            return Ok(Vec::new());
        }
        Ok(all
            .chunks(WIDTH)
            .map(|c| {
                let end = c.iter().position(|&b| b == 0).unwrap_or(WIDTH);
                String::from_utf8_lossy(&c[..end]).into_owned()
            })
            .collect())
    }

    fn seconds_in_collectives(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }
}
