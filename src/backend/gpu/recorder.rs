//! Recording and submitting the wgpu backend's work: one command encoder per submission, the
//! uniform parameter ring, the error flags, buffer creation and read-back.

use super::*;

pub(super) struct Recorder {
    pub(super) encoder: Option<wgpu::CommandEncoder>,
    pub(super) ring: Vec<u8>,
    /// Names (and column counts) of the checks owning each flag slot since the last sync.
    pub(super) pending: Vec<(String, usize)>,
}

impl Gpu {
    pub(super) fn lock_rec(&self) -> Result<std::sync::MutexGuard<'_, Recorder>> {
        self.rec
            .lock()
            .map_err(|_| Error::Gpu("command recorder poisoned by an earlier panic".into()))
    }

    pub(super) fn health(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::Gpu(format!(
                "the device {} was lost; restart the run (or use --backend cpu)",
                self.summary.name
            )));
        }
        if let Some(msg) = self.uncaptured.lock().ok().and_then(|mut g| g.take()) {
            return Err(Error::Gpu(msg));
        }
        Ok(())
    }

    /// Submits everything recorded so far.
    pub(super) fn flush_locked(&self, rec: &mut Recorder) {
        if let Some(enc) = rec.encoder.take() {
            if !rec.ring.is_empty() {
                self.queue.write_buffer(&self.ring, 0, &rec.ring);
            }
            self.queue.submit(Some(enc.finish()));
        }
        rec.ring.clear();
    }

    pub(super) fn flush(&self) -> Result<()> {
        let mut rec = self.lock_rec()?;
        self.flush_locked(&mut rec);
        Ok(())
    }

    pub(super) fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the device: {e}")))?;
        self.health()
    }

    pub(super) fn encoder<'a>(&self, rec: &'a mut Recorder) -> &'a mut wgpu::CommandEncoder {
        rec.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("enff"),
                })
        })
    }

    /// Records one dispatch of `kernel` with `params` and storage `buffers` (in the kernel's
    /// binding order).
    pub(super) fn dispatch<P: Pod>(
        &self,
        kernel: &Kernel,
        params: &P,
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32, u32),
    ) -> Result<()> {
        debug_assert_eq!(buffers.len(), kernel.bindings.len(), "{}", kernel.name);
        if self.lost.load(Ordering::SeqCst) {
            return self.health();
        }
        let mut rec = self.lock_rec()?;
        if rec.ring.len() as u64 + PARAM_SLOT > RING_BYTES {
            self.flush_locked(&mut rec);
        }
        let offset = rec.ring.len() as u32;
        let bytes = bytemuck::bytes_of(params);
        rec.ring.extend_from_slice(bytes);
        rec.ring.resize(offset as usize + PARAM_SLOT as usize, 0);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.ring,
                offset: 0,
                size: wgpu::BufferSize::new(PARAM_SLOT),
            }),
        }];
        for (b, buf) in kernel.bindings.iter().zip(buffers) {
            entries.push(wgpu::BindGroupEntry {
                binding: *b,
                resource: buf.as_entire_binding(),
            });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.name),
            layout: &kernel.layout,
            entries: &entries,
        });
        let enc = self.encoder(&mut rec);
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(kernel.name),
            timestamp_writes: None,
        });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bg, &[offset]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        Ok(())
    }

    /// Number of device buffers created so far (matrices and scratch). A run whose count stops
    /// growing after its first cycles allocates nothing per cycle or per flow step.
    pub fn buffers_allocated(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    pub(super) fn new_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.health()?;
        self.allocations.fetch_add(1, Ordering::Relaxed);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::TooLarge {
                detail: format!(
                    "allocating {:.1} MiB on {} failed: {e}",
                    bytes as f64 / 1048576.0,
                    self.summary.name
                ),
            });
        }
        Ok(buf)
    }

    /// A scratch buffer of at least `floats` values, grown on demand.
    pub(super) fn scratch_buf<'a>(
        &self,
        slot: &'a mut Option<wgpu::Buffer>,
        floats: usize,
        label: &str,
    ) -> Result<&'a wgpu::Buffer> {
        let bytes = (floats.max(4) * 4) as u64;
        if bytes > self.hw_max_binding {
            return Err(Error::TooLarge {
                detail: format!(
                    "{label} needs {:.1} MiB, more than the largest storage binding ({:.1} MiB)",
                    bytes as f64 / 1048576.0,
                    self.hw_max_binding as f64 / 1048576.0
                ),
            });
        }
        if slot.as_ref().is_none_or(|b| b.size() < bytes) {
            let size = bytes
                .next_power_of_two()
                .min(self.hw_max_binding)
                .max(bytes);
            *slot = Some(self.new_buffer(label, size)?);
        }
        Ok(slot.as_ref().expect("just set"))
    }

    /// Registers a flag slot for a deferred check named `name`.
    pub(super) fn flag_slot(&self, name: &str, cols: usize) -> Result<u32> {
        let full = {
            let rec = self.lock_rec()?;
            rec.pending.len() >= FLAG_SLOTS && !rec.pending.iter().any(|(n, _)| n == name)
        };
        if full {
            self.sync()?;
        }
        let mut rec = self.lock_rec()?;
        if let Some(i) = rec.pending.iter().position(|(n, _)| n == name) {
            return Ok(i as u32);
        }
        rec.pending.push((name.to_string(), cols));
        Ok((rec.pending.len() - 1) as u32)
    }

    pub(super) fn read_small(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        // One small staging buffer: hold its lock from the copy until it is unmapped.
        let _staging = self
            .readback_lock
            .lock()
            .map_err(|_| Error::Gpu("readback lock poisoned by an earlier panic".into()))?;
        {
            let mut rec = self.lock_rec()?;
            self.encoder(&mut rec)
                .copy_buffer_to_buffer(src, 0, &self.readback, 0, bytes);
            self.flush_locked(&mut rec);
        }
        self.map_read(&self.readback, bytes)
    }

    pub(super) fn map_read(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        buf.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("buffer mapping callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("mapping a buffer for reading: {e}")))?;
        let out = {
            let view = buf
                .get_mapped_range(0..bytes)
                .map_err(|e| Error::Gpu(format!("reading a mapped buffer: {e}")))?;
            view.to_vec()
        };
        buf.unmap();
        Ok(out)
    }
}
