//! Tensors that stay in a device's memory from one program run to the next.
//!
//! A training run keeps its state (parameters, optimizer states, masks, gradients) in a map of
//! [`Value`]s. On the CPU every value is a host [`Buffer`]. On a device backend (the GPU, or the
//! CUDA emulator standing in for it) a host value passed to a program is uploaded once and the
//! slot becomes a [`DeviceBuffer`]; the program's outputs stay on the device as well. So a
//! training step moves only what changes on the host side (the batch, the step number) to the
//! device, and only what the host reads (the loss, the gradient norm: one element each) back;
//! parameters cross only when a checkpoint is written.
//!
//! Invariant: a [`DeviceBuffer`] owns its allocation (freed on drop) and holds `numel` elements
//! of its dtype in the storage format of [`Buffer`].

use crate::{Buffer, RunError};
use compiler::plan::dtype_bytes;
use lang::types::Dtype;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes moved between the host and a device's memory, and allocations made from the device
/// (see [`DeviceMemory::traffic`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Host to device.
    pub up: u64,
    /// Device to host.
    pub down: u64,
    /// Allocations that the device's allocator made (not served by the [`Pool`]).
    pub allocs: u64,
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic { up: self.up + o.up, down: self.down + o.down, allocs: self.allocs + o.allocs }
    }
}

/// Counters for an implementation of [`DeviceMemory::traffic`].
#[derive(Default, Debug)]
pub struct TrafficCounter {
    up: AtomicU64,
    down: AtomicU64,
    allocs: AtomicU64,
}

impl TrafficCounter {
    pub fn up(&self, bytes: usize) {
        self.up.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn down(&self, bytes: usize) {
        self.down.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn alloc(&self) {
        self.allocs.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> Traffic {
        Traffic {
            up: self.up.load(Ordering::Relaxed),
            down: self.down.load(Ordering::Relaxed),
            allocs: self.allocs.load(Ordering::Relaxed),
        }
    }
}

/// Freed allocations kept for reuse by size, as a caching allocator does: a training step
/// frees what the previous step allocated (its batch, its gradients), and the next step gets
/// the same blocks back, so after the first steps nothing is allocated or freed on the device
/// (a GPU's free synchronizes the device).
#[derive(Default)]
pub struct Pool {
    /// The size of every allocation handed out or kept.
    sizes: std::collections::HashMap<u64, usize>,
    /// Kept allocations by size.
    free: std::collections::HashMap<usize, Vec<u64>>,
}

impl Pool {
    /// A kept allocation of exactly `bytes`, if any.
    pub fn take(&mut self, bytes: usize) -> Option<u64> {
        self.free.get_mut(&bytes)?.pop()
    }
    /// Records a fresh allocation.
    pub fn handed_out(&mut self, ptr: u64, bytes: usize) {
        self.sizes.insert(ptr, bytes);
    }
    /// Keeps a freed allocation (ignores pointers it did not hand out).
    pub fn give_back(&mut self, ptr: u64) {
        if let Some(&bytes) = self.sizes.get(&ptr) {
            self.free.entry(bytes).or_default().push(ptr);
        }
    }
    /// The kept allocations, forgotten (to release them when the device runs out of memory).
    pub fn release_kept(&mut self) -> Vec<u64> {
        let kept: Vec<u64> = self.free.drain().flat_map(|(_, v)| v).collect();
        for p in &kept {
            self.sizes.remove(p);
        }
        kept
    }
    /// Every allocation, kept or handed out, with its size (to release them all at the end).
    pub fn drain(&mut self) -> Vec<(u64, usize)> {
        self.free.clear();
        self.sizes.drain().collect()
    }
    /// The allocations handed out and not given back.
    pub fn in_use(&self) -> usize {
        self.sizes.len() - self.free.values().map(|v| v.len()).sum::<usize>()
    }
}

/// A device's memory: allocations addressed by 64-bit device pointers. Implementations keep
/// freed allocations in a [`Pool`] and release them when the memory itself is dropped (every
/// [`DeviceBuffer`] holds its memory, so that is after the last buffer).
pub trait DeviceMemory: Send + Sync {
    fn alloc(&self, bytes: usize) -> Result<u64, RunError>;
    /// Returns an allocation of [`DeviceMemory::alloc`] to the pool.
    fn free(&self, ptr: u64);
    /// Copies `src` to `dst`, which holds at least `src.len()` bytes.
    fn upload(&self, dst: u64, src: &[u8]) -> Result<(), RunError>;
    /// Copies `dst.len()` bytes from `src` into `dst`.
    fn download(&self, dst: &mut [u8], src: u64) -> Result<(), RunError>;
    /// Copies `bytes` bytes from `src` to `dst`, both on this device.
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), RunError>;
    /// The bytes uploaded and downloaded so far through this memory.
    fn traffic(&self) -> Traffic;
}

/// A tensor in a device's memory, in [`Buffer`]'s storage format; freed on drop.
pub struct DeviceBuffer {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    ptr: u64,
    mem: Arc<dyn DeviceMemory>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({}{:?} at {:#x})", self.dtype, self.shape, self.ptr)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.mem.free(self.ptr);
    }
}

fn nbytes(dtype: Dtype, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() * dtype_bytes(dtype)
}

impl DeviceBuffer {
    /// A fresh allocation of `dtype[shape]` (its contents undefined).
    pub fn alloc(mem: &Arc<dyn DeviceMemory>, dtype: Dtype, shape: Vec<usize>) -> Result<DeviceBuffer, RunError> {
        // One byte at least: an empty tensor still gets a distinct address.
        let ptr = mem.alloc(nbytes(dtype, &shape).max(1))?;
        Ok(DeviceBuffer { dtype, shape, ptr, mem: mem.clone() })
    }
    /// A device copy of a host buffer.
    pub fn upload(mem: &Arc<dyn DeviceMemory>, b: &Buffer) -> Result<DeviceBuffer, RunError> {
        let d = DeviceBuffer::alloc(mem, b.dtype, b.shape.clone())?;
        mem.upload(d.ptr, b.as_bytes())?;
        Ok(d)
    }
    /// A device copy of `bytes(dtype, shape)` bytes at `src` (on the same device).
    pub fn copy_of(
        mem: &Arc<dyn DeviceMemory>,
        src: u64,
        dtype: Dtype,
        shape: Vec<usize>,
    ) -> Result<DeviceBuffer, RunError> {
        let d = DeviceBuffer::alloc(mem, dtype, shape)?;
        mem.copy(d.ptr, src, d.bytes())?;
        Ok(d)
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        nbytes(self.dtype, &self.shape)
    }
    pub fn memory(&self) -> &Arc<dyn DeviceMemory> {
        &self.mem
    }
    /// The tensor copied to the host.
    pub fn download(&self) -> Result<Buffer, RunError> {
        let mut b = Buffer::zeros(self.dtype, self.shape.clone());
        self.mem.download(b.as_bytes_mut(), self.ptr)?;
        Ok(b)
    }
    /// Element `i` as f64 (one element copied to the host).
    pub fn get(&self, i: usize) -> Result<f64, RunError> {
        let numel: usize = self.shape.iter().product();
        if i >= numel {
            return Err(RunError(format!("element {i} of a {}{:?} tensor", self.dtype, self.shape)));
        }
        let size = dtype_bytes(self.dtype);
        let mut one = Buffer::zeros(self.dtype, vec![1]);
        self.mem.download(one.as_bytes_mut(), self.ptr + (i * size) as u64)?;
        Ok(one.get(0))
    }
}

/// A tensor of a run's state: in host memory or resident on a device.
#[derive(Debug)]
pub enum Value {
    Host(Buffer),
    Device(DeviceBuffer),
}

impl From<Buffer> for Value {
    fn from(b: Buffer) -> Value {
        Value::Host(b)
    }
}

impl Value {
    pub fn dtype(&self) -> Dtype {
        match self {
            Value::Host(b) => b.dtype,
            Value::Device(d) => d.dtype,
        }
    }
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::Host(b) => &b.shape,
            Value::Device(d) => &d.shape,
        }
    }
    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }
    pub fn bytes(&self) -> usize {
        nbytes(self.dtype(), self.shape())
    }
    /// The tensor on the host (borrowed, or downloaded from the device).
    pub fn host(&self) -> Result<Cow<'_, Buffer>, RunError> {
        match self {
            Value::Host(b) => Ok(Cow::Borrowed(b)),
            Value::Device(d) => Ok(Cow::Owned(d.download()?)),
        }
    }
    /// The tensor as a host buffer (downloaded if on a device).
    pub fn into_host(self) -> Result<Buffer, RunError> {
        match self {
            Value::Host(b) => Ok(b),
            Value::Device(d) => d.download(),
        }
    }
    /// Element `i` as f64 (a device value copies just that element).
    pub fn get(&self, i: usize) -> Result<f64, RunError> {
        match self {
            Value::Host(b) if i < b.numel() => Ok(b.get(i)),
            Value::Host(b) => Err(RunError(format!("element {i} of a {}{:?} tensor", b.dtype, b.shape))),
            Value::Device(d) => d.get(i),
        }
    }
    /// A copy with another shape of the same element count, where the value is.
    pub fn reshaped(&self, shape: Vec<usize>) -> Result<Value, RunError> {
        match self {
            Value::Host(b) => Ok(Value::Host(Buffer::from_bytes(b.dtype, shape, b.as_bytes()))),
            Value::Device(d) => Ok(Value::Device(DeviceBuffer::copy_of(&d.mem, d.ptr, d.dtype, shape)?)),
        }
    }
    /// A placeholder left in a slot whose value was moved out.
    pub(crate) fn taken() -> Value {
        Value::Host(Buffer::empty())
    }
}

/// The device address of every argument, uploading host values into `mem` first (their slots
/// become device values: they stay resident for the next program).
pub(crate) fn make_resident(mem: &Arc<dyn DeviceMemory>, args: &mut [Value]) -> Result<Vec<u64>, RunError> {
    let mut ptrs = Vec::with_capacity(args.len());
    for a in args.iter_mut() {
        if let Value::Host(b) = a {
            *a = Value::Device(DeviceBuffer::upload(mem, b)?);
        }
        let Value::Device(d) = a else { unreachable!("uploaded above") };
        ptrs.push(d.ptr);
    }
    Ok(ptrs)
}

/// Checks values against a program's parameters (number, dtypes, shapes).
pub(crate) fn check_values(p: &compiler::kernel::Program, args: &[Value]) -> Result<(), RunError> {
    let types: Vec<(Dtype, &[usize])> = args.iter().map(|a| (a.dtype(), a.shape())).collect();
    crate::check_types(p, &types)
}

/// The emulator's stand-in for a GPU's memory: host allocations (64-byte aligned) behind device
/// pointers, with the same explicit copies and the same pool, counted, so tests see what a GPU
/// run would move and allocate.
#[derive(Default)]
pub struct HostMemory {
    pool: std::sync::Mutex<Pool>,
    traffic: TrafficCounter,
}

impl HostMemory {
    fn layout(bytes: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(bytes.max(1), 64).expect("a valid layout")
    }
    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        for (ptr, bytes) in self.pool().drain() {
            // SAFETY: allocated by `alloc` with this layout; nothing holds it any more (every
            // buffer holds this memory, which is being dropped).
            unsafe { std::alloc::dealloc(ptr as *mut u8, Self::layout(bytes)) };
        }
    }
}

impl DeviceMemory for HostMemory {
    fn alloc(&self, bytes: usize) -> Result<u64, RunError> {
        let mut pool = self.pool();
        if let Some(p) = pool.take(bytes) {
            return Ok(p);
        }
        // SAFETY: a non-zero size; released with the same layout in `drop`.
        let p = unsafe { std::alloc::alloc_zeroed(Self::layout(bytes)) };
        if p.is_null() {
            return Err(RunError(format!("emulated device: cannot allocate {bytes} bytes")));
        }
        self.traffic.alloc();
        pool.handed_out(p as u64, bytes);
        Ok(p as u64)
    }
    fn free(&self, ptr: u64) {
        self.pool().give_back(ptr);
    }
    fn upload(&self, dst: u64, src: &[u8]) -> Result<(), RunError> {
        self.traffic.up(src.len());
        // SAFETY: `dst` is an allocation of at least `src.len()` bytes (the trait's contract).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }
    fn download(&self, dst: &mut [u8], src: u64) -> Result<(), RunError> {
        self.traffic.down(dst.len());
        // SAFETY: `src` holds at least `dst.len()` bytes (the trait's contract).
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), RunError> {
        // SAFETY: both hold `bytes` bytes; distinct allocations or the same range.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }
    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use compiler::interp::Tensor;

    #[test]
    fn values_round_trip_through_device_memory_and_count_the_bytes() {
        let host = Arc::new(HostMemory::default());
        let mem: Arc<dyn DeviceMemory> = host.clone();
        let t = Tensor::new(Dtype::F32, vec![2, 3], vec![1.0, -2.0, 3.5, 4.0, 5.0, 6.25]);
        let mut slots = vec![Value::Host(Buffer::from_tensor(&t))];
        let ptrs = make_resident(&mem, &mut slots).unwrap();
        assert!(matches!(slots[0], Value::Device(_)));
        assert_eq!(mem.traffic(), Traffic { up: 24, down: 0, allocs: 1 });
        // Resident values are not uploaded again.
        assert_eq!(make_resident(&mem, &mut slots).unwrap(), ptrs);
        assert_eq!(mem.traffic().up, 24);
        assert_eq!(slots[0].get(2).unwrap(), 3.5);
        assert_eq!(mem.traffic().down, 4);
        let r = slots[0].reshaped(vec![3, 2]).unwrap();
        assert_eq!(r.shape(), &[3, 2]);
        assert_eq!(r.into_host().unwrap().to_tensor().data, t.data);
        assert_eq!(mem.traffic(), Traffic { up: 24, down: 28, allocs: 2 });
        assert!(slots[0].get(6).is_err());
        drop(slots);
        assert_eq!(host.pool().in_use(), 0, "every allocation given back");
        // Given-back allocations of the size are reused.
        let again = DeviceBuffer::upload(&mem, &Buffer::from_tensor(&t)).unwrap();
        assert_eq!(mem.traffic().allocs, 2, "served from the pool");
        assert_eq!(host.pool().in_use(), 1);
        // What the pool keeps can be released (a GPU out of memory does); what is in use stays.
        let kept = host.pool().release_kept();
        assert_eq!(kept.len(), 1);
        for p in kept {
            // SAFETY: a kept allocation of 24 bytes from `alloc`, no longer in the pool.
            unsafe { std::alloc::dealloc(p as *mut u8, HostMemory::layout(24)) };
        }
        assert_eq!(host.pool().in_use(), 1);
        drop(again);
        assert_eq!(host.pool().in_use(), 0);
    }

    /// A CPU executable given a device value copies it home and runs as on host buffers.
    #[test]
    fn a_cpu_runner_takes_device_values_home() {
        use crate::{Runner, ValueOut};
        use compiler::ir::{Bin, Graph, Op};
        let mut g = Graph::new("double");
        let x = g.add(Op::Input { index: 0, name: "x".into() }, Dtype::F32, vec![3], &[], "x").unwrap();
        let y = g.add(Op::Binary(Bin::Add), Dtype::F32, vec![3], &[x, x], "y").unwrap();
        g.outputs.push(("y".into(), y));
        let exe = crate::Executable::new(compiler::kernel::schedule(&g).unwrap(), crate::Backend::Cranelift).unwrap();
        let mem: Arc<dyn DeviceMemory> = Arc::new(HostMemory::default());
        let t = Tensor::new(Dtype::F32, vec![3], vec![1.5, -2.0, 4.0]);
        let mut args = vec![Value::Device(DeviceBuffer::upload(&mem, &Buffer::from_tensor(&t)).unwrap())];
        let outs = exe.run_values(&mut args, 0).unwrap();
        assert!(matches!(args[0], Value::Host(_)));
        let ValueOut::Value(Value::Host(y)) = &outs[0].1 else { panic!("{outs:?}") };
        assert_eq!(y.to_tensor().data, vec![3.0, -4.0, 8.0]);
        assert_eq!(exe.traffic(), None);
    }
}
