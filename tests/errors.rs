//! Bad inputs give the documented typed errors, with messages that say what to change.

mod common;

use common::context;
use margin_softmax::{Error, LossParams, Pass, Problem, Shape, IGNORE};

fn call(p: &Problem, params: &LossParams) -> Result<margin_softmax::LossOutput, Error> {
    context().loss_on(p, params, Pass::ForwardBackward)
}

#[test]
fn wrong_lengths() {
    let mut p = Problem::random(Shape::new(3, 4, 5), 1);
    p.features.pop();
    let e = call(&p, &LossParams::default()).unwrap_err();
    assert_eq!(
        e,
        Error::LengthMismatch {
            input: "features",
            expected: 12,
            actual: 11
        }
    );
    assert!(e.to_string().contains("exactly 12"));
    let mut p = Problem::random(Shape::new(3, 4, 5), 1);
    p.labels.push(0);
    assert!(matches!(
        call(&p, &LossParams::default()),
        Err(Error::LengthMismatch {
            input: "labels",
            ..
        })
    ));
    let mut p = Problem::random(Shape::new(3, 4, 5), 1);
    p.classes.extend([0.0; 4]);
    assert!(matches!(
        call(&p, &LossParams::default()),
        Err(Error::LengthMismatch {
            input: "classes",
            ..
        })
    ));
}

#[test]
fn labels_out_of_range() {
    let mut p = Problem::random(Shape::new(3, 4, 5), 2);
    p.labels[2] = 5;
    let e = call(&p, &LossParams::default()).unwrap_err();
    assert_eq!(
        e,
        Error::LabelOutOfRange {
            row: Some(2),
            label: Some(5),
            classes: 5
        }
    );
    assert!(e.to_string().contains("0..5"));
    p.labels[2] = IGNORE;
    assert!(call(&p, &LossParams::default()).is_ok());
}

#[test]
fn invalid_parameters() {
    let p = Problem::random(Shape::new(3, 4, 5), 3);
    let with = |scale, scale_min, margin| LossParams {
        scale,
        scale_min,
        margin,
        ..LossParams::default()
    };
    for (params, name) in [
        (with(0.0, 0.0, 0.3), "scale"),
        (with(-1.0, 0.0, 0.3), "scale"),
        (with(f32::NAN, 1.0, 0.3), "scale"),
        (with(30.0, f32::INFINITY, 0.3), "scale_min"),
        (with(30.0, -1.0, 0.3), "scale_min"),
        (with(30.0, 0.0, f32::NAN), "margin"),
        (with(30.0, 0.0, 3.0), "margin"),
        (with(2e6, 0.0, 0.3), "scale"),
    ] {
        match call(&p, &params) {
            Err(Error::InvalidParameter { name: n, .. }) => assert_eq!(n, name, "{params:?}"),
            other => panic!("{params:?}: expected InvalidParameter({name}), got {other:?}"),
        }
    }
    // A scale below a positive floor is not an error: the effective scale is the floor.
    assert!(call(&p, &with(-1.0, 5.0, 0.3)).is_ok());
    for loss_scale in [0.0, -2.0, f32::NAN, f32::INFINITY] {
        let params = LossParams {
            loss_scale,
            ..LossParams::default()
        };
        match call(&p, &params) {
            Err(Error::InvalidParameter { name, .. }) => assert_eq!(name, "loss_scale"),
            other => panic!("loss_scale {loss_scale}: expected InvalidParameter, got {other:?}"),
        }
    }
}

#[test]
fn empty_shapes() {
    for (shape, dimension) in [
        (Shape::new(0, 4, 5), "batch"),
        (Shape::new(3, 0, 5), "dim"),
        (Shape::new(3, 4, 0), "classes"),
    ] {
        let p = Problem::random(shape, 4);
        assert_eq!(
            call(&p, &LossParams::default()).unwrap_err(),
            Error::EmptyShape { dimension }
        );
    }
}

#[test]
fn non_finite_inputs_are_flagged_on_the_gpu() {
    for (value, input) in [
        (f32::NAN, "features"),
        (f32::INFINITY, "classes"),
        (f32::NEG_INFINITY, "features"),
    ] {
        let mut p = Problem::random(Shape::new(6, 4, 7), 5);
        match input {
            "features" => p.features[13] = value,
            _ => p.classes[20] = value,
        }
        assert_eq!(
            call(&p, &LossParams::default()).unwrap_err(),
            Error::NonFinite { input }
        );
    }
    // The context stays usable afterwards.
    let p = Problem::random(Shape::new(6, 4, 7), 5);
    assert!(call(&p, &LossParams::default()).is_ok());
}

#[test]
fn too_large_for_the_adapter() {
    let ctx = context();
    let limit = ctx.limits().max_storage_buffer_binding_size;
    // Features are bound whole: B·D·4 past one binding is refused.
    let batch = (limit / 4 / 64 + 1) as usize;
    match margin_softmax::Plan::new(ctx, Shape::new(batch, 64, 10)) {
        Err(Error::TooLarge { .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // A class vector so long that no aligned chunk of classes fits one binding.
    let dim = (limit / 4 / 32) as usize;
    match margin_softmax::Plan::new(ctx, Shape::new(1, dim, 1000)) {
        Err(Error::TooLarge { .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
}
