//! GPU time of one recording: two timestamps around its compute pass where the adapter
//! has them, else host wall clock around its submit and wait. The benchmark and the
//! GEMM tuner time with it.

use std::time::Instant;

use crate::context::Context;
use crate::error::Result;
use crate::kernels::Timestamps;

/// A recording of one operation with the timestamps asked for, returning its kernels'
/// names in dispatch order.
pub(crate) type Record<'a> =
    &'a dyn Fn(&mut wgpu::CommandEncoder, Timestamps<'_>) -> Result<Vec<&'static str>>;

/// Two timestamps around a compute pass, their resolved copy and a readable buffer.
pub(crate) struct TimestampQueries {
    set: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readable: wgpu::Buffer,
    period_ns: f64,
}

impl TimestampQueries {
    /// Where the adapter has timestamps.
    pub(crate) fn new(ctx: &Context) -> Option<TimestampQueries> {
        ctx.has_timestamps().then(|| {
            let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let buffer = |usage| {
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: 16,
                    usage,
                    mapped_at_creation: false,
                })
            };
            TimestampQueries {
                set,
                resolved: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
                readable: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
                period_ns: f64::from(ctx.queue.get_timestamp_period()),
            }
        })
    }
}

/// Seconds of one run of `record`: between the timestamps where there are `queries`,
/// else host wall clock around the submit and wait.
pub(crate) fn time_recording(
    ctx: &Context,
    queries: Option<&TimestampQueries>,
    record: Record<'_>,
) -> Result<f64> {
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let writes = queries.map_or(Timestamps::Off, |q| Timestamps::Pass(&q.set));
    ctx.gpu_scoped(|| record(&mut encoder, writes))?;
    if let Some(q) = queries {
        encoder.resolve_query_set(&q.set, 0..2, &q.resolved, 0);
    }
    let start = Instant::now();
    let submission = ctx.queue.submit([encoder.finish()]);
    ctx.wait(submission)?;
    let wall = start.elapsed().as_secs_f64();
    let Some(q) = queries else { return Ok(wall) };
    // Copied in a second encoder: on Vulkan a copy in the resolving encoder can read 0.
    let mut copy = ctx.device.create_command_encoder(&Default::default());
    copy.copy_buffer_to_buffer(&q.resolved, 0, &q.readable, 0, 16);
    let submission = ctx.queue.submit([copy.finish()]);
    let bytes = pollster::block_on(ctx.read_back(&q.readable, 16, submission))?;
    let stamps: [u64; 2] = bytemuck::pod_read_unaligned(&bytes);
    Ok(stamps[1].saturating_sub(stamps[0]) as f64 * q.period_ns * 1e-9)
}
