//! The article's figures, kept working: a short training run on the digits with the
//! crate's gradients, and properties of the sphere maps.

mod common;

#[allow(dead_code)]
#[path = "../examples/digits_core.rs"]
mod digits;

use common::context;
use margin_softmax::{sphere, LossParams};

#[test]
fn a_few_epochs_on_the_digits_learn() {
    let data = digits::load_digits();
    assert_eq!(data.labels.len(), 1797);
    let run = digits::train(context(), &data, 0.35, 40, 7);
    let first = run.history[0];
    let last = *run.history.last().expect("epochs");
    assert!(
        last.loss < 0.8 * first.loss,
        "loss {} -> {}",
        first.loss,
        last.loss
    );
    // Chance is 0.1 for ten classes.
    assert!(
        last.test_accuracy > 0.5,
        "test accuracy {}",
        last.test_accuracy
    );
    assert!(last.intra_class_degrees < first.intra_class_degrees);
}

#[test]
fn sphere_maps_have_the_article_properties() {
    let ctx = context();
    let classes = sphere::default_class_vectors(10);
    let size = 64;
    let params = LossParams {
        scale: 30.0,
        margin: 0.0,
        ..LossParams::default()
    };
    let image = sphere::render(ctx, &classes, &params, size, &[]).expect("render");
    let gap = size / 16 + 2;
    assert_eq!(
        (image.width, image.height),
        (2 * size + 3 * gap, size + 2 * gap)
    );
    let png = image.to_png().expect("png");
    assert_eq!(&png[1..4], b"PNG");

    // At a class centre the probability is the top of the scale, and so is the colour
    // just outside the centre's marker.
    let at_centres =
        sphere::max_class_probability(ctx, &classes, &classes, &params).expect("probability");
    assert!(at_centres.iter().all(|&p| p > 0.95), "{at_centres:?}");
    let front = classes
        .chunks_exact(3)
        .find(|c| c[2] > 0.3)
        .expect("a class on the front");
    let r = size as f32 / 2.0;
    let (x, y) = (
        (front[0] * r + r) as usize + (size / 50).max(2) + 3,
        (r - front[1] * r) as usize,
    );
    let [red, green, _] = image.pixel(gap + x, gap + y);
    assert!(
        red > 150 && green > 150,
        "colour near a class centre: {:?}",
        image.pixel(gap + x, gap + y)
    );

    // A margin shrinks the region where the class counts as correct (p > 0.5).
    let area = |margin| {
        let p = LossParams { margin, ..params };
        sphere::high_probability_fraction(ctx, &classes, &p, 4000).expect("area")
    };
    let (plain, margined) = (area(0.0), area(0.35));
    assert!(
        margined < 0.6 * plain,
        "p > 0.5 on {plain} of the sphere without a margin, {margined} with"
    );
}
