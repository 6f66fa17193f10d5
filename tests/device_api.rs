//! The device API driven as an engine drives it: its own buffers (inside larger ones, at
//! offsets, with guard bytes around), its own encoder, one submit and one read-back.

mod common;

use common::context;
use margin_softmax::{
    BufferRegion, DeviceInputs, DeviceOutputs, Error, GradOutputs, LossParams, Pass, Plan, Problem,
    RowStats, Shape, Summary,
};
use wgpu::util::DeviceExt;

const GUARD: f32 = -7.25;

/// One buffer holding every input and output at 256-aligned offsets, pre-filled with
/// GUARD so that writes outside the documented ranges show.
struct Arena {
    buffer: wgpu::Buffer,
    offsets: Vec<u64>,
    len: u64,
}

fn arena(ctx: &margin_softmax::Context, sizes: &[u64]) -> Arena {
    let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    let mut offsets = Vec::new();
    let mut at = align; // leading guard
    for s in sizes {
        offsets.push(at);
        at = (at + s).div_ceil(align) * align + align; // trailing guard
    }
    let buffer = ctx
        .device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("engine arena"),
            contents: bytemuck::cast_slice(&vec![GUARD; (at / 4) as usize]),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        });
    Arena {
        buffer,
        offsets,
        len: at,
    }
}

/// Submits `encoder`, then the first `len` bytes of `buffer`.
fn read(
    ctx: &margin_softmax::Context,
    buffer: &wgpu::Buffer,
    len: u64,
    encoder: wgpu::CommandEncoder,
) -> Vec<u8> {
    ctx.queue().submit([encoder.finish()]);
    common::read_back(ctx, buffer)[..len as usize].to_vec()
}

#[test]
fn engine_buffers_match_the_slice_api_and_guards_stay_intact() {
    let ctx = context();
    let shape = Shape::new(45, 19, 131);
    let p = Problem::random(shape, 21);
    let params = LossParams::default();
    let (b, c, d) = (shape.batch as u64, shape.classes as u64, shape.dim as u64);
    // Inputs in one buffer, outputs in another (WebGPU forbids one buffer bound as
    // read-only and writable storage in one dispatch), each at aligned offsets with guards.
    let in_sizes = [b * d * 4, c * d * 4, b * 4];
    let out_sizes = [
        b * std::mem::size_of::<RowStats>() as u64,
        32,
        b * d * 4,
        c * d * 4,
    ];
    let inputs = arena(ctx, &in_sizes);
    let outputs = arena(ctx, &out_sizes);
    let o = &inputs.offsets;
    ctx.queue()
        .write_buffer(&inputs.buffer, o[0], bytemuck::cast_slice(&p.features));
    ctx.queue()
        .write_buffer(&inputs.buffer, o[1], bytemuck::cast_slice(&p.classes));
    ctx.queue()
        .write_buffer(&inputs.buffer, o[2], bytemuck::cast_slice(&p.labels));
    let plan = Plan::new(ctx, shape).expect("plan");
    let input = |k: usize| BufferRegion {
        buffer: &inputs.buffer,
        offset: inputs.offsets[k],
    };
    let output = |k: usize| BufferRegion {
        buffer: &outputs.buffer,
        offset: outputs.offsets[k],
    };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    plan.record(
        ctx,
        &mut encoder,
        &DeviceInputs {
            features: input(0),
            classes: input(1),
            labels: input(2),
            row_margins: None,
            hard_thresholds: None,
        },
        &DeviceOutputs {
            row_stats: output(0),
            summary: output(1),
            grads: Some(GradOutputs {
                features: output(2),
                classes: output(3),
            }),
        },
        &params,
    )
    .expect("record");
    let bytes = read(ctx, &outputs.buffer, outputs.len, encoder);
    let floats: &[f32] = bytemuck::cast_slice(&bytes);

    // Everything outside the documented output ranges still holds the guard value.
    let o = &outputs.offsets;
    let mut inside = vec![false; floats.len()];
    for (k, s) in out_sizes.iter().enumerate() {
        for e in (o[k] / 4)..((o[k] + s) / 4) {
            inside[e as usize] = true;
        }
    }
    let touched = floats
        .iter()
        .zip(&inside)
        .filter(|(v, inside)| !**inside && **v != GUARD)
        .count();
    assert_eq!(
        touched, 0,
        "elements outside the documented ranges were written"
    );

    let slice = ctx
        .loss_on(&p, &params, Pass::ForwardBackward)
        .expect("slice api");
    let at = |k: usize| &bytes[o[k] as usize..(o[k] + out_sizes[k]) as usize];
    let summary: Summary = bytemuck::pod_read_unaligned(at(1));
    let rows: Vec<RowStats> = bytemuck::pod_collect_to_vec(at(0));
    let grads = slice.grads.expect("grads");
    assert_eq!(summary.loss.to_bits(), slice.loss.to_bits());
    assert_eq!(summary.scale_grad.to_bits(), slice.grad_scale.to_bits());
    assert_eq!(summary.valid_rows, slice.valid_rows);
    assert_eq!(rows.iter().map(|r| r.pred).collect::<Vec<_>>(), slice.pred);
    assert_eq!(
        rows.iter().map(|r| r.loss.to_bits()).collect::<Vec<_>>(),
        slice
            .row_loss
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    );
    let bits = |v: &[u8]| bytemuck::cast_slice::<u8, u32>(v).to_vec();
    let as_bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(at(2)), as_bits(&grads.features));
    assert_eq!(bits(at(3)), as_bits(&grads.classes));
}

#[test]
fn forward_only_leaves_gradient_buffers_alone() {
    let ctx = context();
    let shape = Shape::new(7, 5, 9);
    let p = Problem::random(shape, 22);
    let f = |len: usize| {
        ctx.device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&vec![GUARD; len]),
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            })
    };
    let (x, w, y) = (f(35), f(45), f(7));
    ctx.queue()
        .write_buffer(&x, 0, bytemuck::cast_slice(&p.features));
    ctx.queue()
        .write_buffer(&w, 0, bytemuck::cast_slice(&p.classes));
    ctx.queue()
        .write_buffer(&y, 0, bytemuck::cast_slice(&p.labels));
    let (stats, summary) = (f(7 * 6), f(8));
    let plan = Plan::new(ctx, shape).expect("plan");
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    plan.record(
        ctx,
        &mut encoder,
        &DeviceInputs {
            features: (&x).into(),
            classes: (&w).into(),
            labels: (&y).into(),
            row_margins: None,
            hard_thresholds: None,
        },
        &DeviceOutputs {
            row_stats: (&stats).into(),
            summary: (&summary).into(),
            grads: None,
        },
        &LossParams::default(),
    )
    .expect("record");
    let bytes = read(ctx, &summary, 32, encoder);
    let s: Summary = bytemuck::pod_read_unaligned(&bytes);
    let expected = ctx
        .loss(
            shape,
            &p.features,
            &p.classes,
            &p.labels,
            &LossParams::default(),
            Pass::Forward,
        )
        .expect("slice");
    assert_eq!(s.loss.to_bits(), expected.loss.to_bits());
    assert!(expected.grads.is_none());
}

#[test]
fn unusable_caller_buffers_are_typed_errors() {
    let ctx = context();
    let shape = Shape::new(4, 4, 4);
    let plan = Plan::new(ctx, shape).expect("plan");
    let make = |size, usage| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let good = make(4096, wgpu::BufferUsages::STORAGE);
    let not_storage = make(4096, wgpu::BufferUsages::COPY_DST);
    let small = make(16, wgpu::BufferUsages::STORAGE);
    let try_record = |features: BufferRegion<'_>| {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        plan.record(
            ctx,
            &mut encoder,
            &DeviceInputs {
                features,
                classes: (&good).into(),
                labels: (&good).into(),
                row_margins: None,
                hard_thresholds: None,
            },
            &DeviceOutputs {
                row_stats: (&good).into(),
                summary: (&good).into(),
                grads: None,
            },
            &LossParams::default(),
        )
    };
    // An output sharing the features' buffer is refused before wgpu sees it.
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let shared = make(4096, wgpu::BufferUsages::STORAGE);
    let e = plan
        .record(
            ctx,
            &mut encoder,
            &DeviceInputs {
                features: (&shared).into(),
                classes: (&good).into(),
                labels: (&good).into(),
                row_margins: None,
                hard_thresholds: None,
            },
            &DeviceOutputs {
                row_stats: BufferRegion {
                    buffer: &shared,
                    offset: 1024,
                },
                summary: (&make(256, wgpu::BufferUsages::STORAGE)).into(),
                grads: None,
            },
            &LossParams::default(),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadBuffer {
                role: "row_stats",
                ..
            }
        ),
        "{e}"
    );
    for (region, needle) in [
        (BufferRegion::from(&not_storage), "STORAGE"),
        (BufferRegion::from(&small), "larger"),
        (
            BufferRegion {
                buffer: &good,
                offset: 4,
            },
            "multiple",
        ),
    ] {
        match try_record(region) {
            Err(
                e @ Error::BadBuffer {
                    role: "features", ..
                },
            ) => {
                assert!(e.to_string().contains(needle), "{e}")
            }
            other => panic!("expected BadBuffer for features, got {other:?}"),
        }
    }
}
