// The margin function ψ and the logit gradient G, shared by the forward and backward
// families (prepended to forward.wgsl and backward.wgsl, after common.wgsl). Reads
// `params.loss`, `params.batch` and `params.total_classes` of the family's uniform, and
// the per-row margins where the call has them.

/// s and the margin function: what turns a cosine into a logit. Mirrors `LossTerms` in
/// `src/kernels.rs`; the first member of the forward and backward uniforms.
struct LossTerms {
    /// s, already max(s, s_min).
    scale: f32,
    /// m, subtracted from the target cosine.
    margin: f32,
    /// m1, the multiplicative (SphereFace) margin, a whole number ≥ 1.
    multiplicative_margin: u32,
    /// m2, the additive angular (ArcFace) margin in radians, and its cosine and sine.
    angular_margin: f32,
    cos_m2: f32,
    sin_m2: f32,
    /// 0 = margin softmax, 1 = hard margin max(0, s·(max_{j≠y} c_j − ψ(c_y))).
    objective: u32,
    /// 1: the margin passes no gradient of its own (dψ/dc taken as 1); 0: exact dψ/dc.
    straight_through: u32,
    /// 1: each row's (m2_i, m3_i) from `row_margins` replace `angular_margin` and `margin`
    /// (multiplicative_margin is then 1); 0: one margin for every row.
    per_row: u32,
    /// 1: the target logit is s·c where c ≤ 0 (easy margin).
    easy_margin: u32,
    /// InsightFace's inter-class filter: a non-target cosine above it counts as 0 (read
    /// where OTHER_TERMS has the filter).
    filter_threshold: f32,
    /// 1: AdaFace's form, c clamped to [−1 + ε, 1 − ε] and θ + m2 clipped to [ε, π − ε]
    /// with zero slope where either binds; 0: ArcFace's fallback.
    angle_clip: u32,
    /// CurricularFace's t for this step (read where OTHER_TERMS has CurricularFace).
    curricular_t: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

/// Which options reweight the non-target cosines, set per pipeline so that the loop over
/// classes of a call without them compiles to the plain one: bit 0 the inter-class
/// filter (`filter_threshold`), bit 1 CurricularFace (`curricular_t`, `hard_thresholds`).
override OTHER_TERMS: u32 = 0u;

/// Per-row margins (m2_i, m3_i), B pairs: the additive angular margin in [0, π) (in
/// [−π, π) with `angle_clip`) and the
/// additive cosine margin of row i's target, read where `params.loss.per_row` is 1 (else
/// a stand-in). Caller's input, or a schedule's output.
@group(0) @binding(29) var<storage, read> row_margins: array<vec2<f32>>;

/// CurricularFace's φ_i, B values: row i's cos(θ_iy + m) (without ArcFace's fallback), above
/// which a non-target cosine is hard. Read where OTHER_TERMS has CurricularFace (else a
/// stand-in). Caller's input, from `schedule::CurricularFace`.
@group(0) @binding(30) var<storage, read> hard_thresholds: array<f32>;

const PI: f32 = 3.14159265358979;
/// sin θ is clamped to at least this in the exact gradient of an angular margin (see
/// `SIN_GUARD` in `src/params.rs`).
const SIN_GUARD: f32 = 1e-3;
/// ε of AdaFace's angular form (see `ANGLE_CLIP` in `src/params.rs`).
const ANGLE_CLIP: f32 = 1e-3;
/// cos ε, rounded to f32 (WGSL's cos need only be within 2⁻¹¹).
const COS_ANGLE_CLIP: f32 = 0.9999995;

/// (T_m(c), U_{m−1}(c)) = (cos mθ, sin mθ / sin θ) for c = cos θ, m ≥ 1, by the
/// Chebyshev recurrences: exact polynomials, no acos and no division.
fn chebyshev(m: u32, c: f32) -> vec2<f32> {
    var t_prev = 1.0;
    var t = c;
    var u_prev = 0.0;
    var u = 1.0;
    for (var n = 1u; n < m; n++) {
        let t_next = 2.0 * c * t - t_prev;
        t_prev = t;
        t = t_next;
        let u_next = 2.0 * c * u - u_prev;
        u_prev = u;
        u = u_next;
    }
    return vec2<f32>(t, u);
}

/// (cos x, sin x) for x in [−π, π], to about an ulp of 1: by the Taylor series (to x¹⁴
/// and x¹⁵) on [0, π/2], and by symmetry past it. WGSL's cos and sin need only be within
/// 2⁻¹¹ there, which a per-row margin would carry into every target logit.
fn cos_sin(signed_x: f32) -> vec2<f32> {
    let x = abs(signed_x);
    let folded = x > 0.5 * PI;
    let t = select(x, PI - x, folded);
    let t2 = t * t;
    var c = 1.0 / 87178291200.0;
    var s = 1.0 / 1307674368000.0;
    c = fma(c, -t2, 1.0 / 479001600.0);
    s = fma(s, -t2, 1.0 / 6227020800.0);
    c = fma(c, -t2, 1.0 / 3628800.0);
    s = fma(s, -t2, 1.0 / 39916800.0);
    c = fma(c, -t2, 1.0 / 40320.0);
    s = fma(s, -t2, 1.0 / 362880.0);
    c = fma(c, -t2, 1.0 / 720.0);
    s = fma(s, -t2, 1.0 / 5040.0);
    c = fma(c, -t2, 1.0 / 24.0);
    s = fma(s, -t2, 1.0 / 120.0);
    c = fma(c, -t2, 0.5);
    s = fma(s, -t2, 1.0 / 6.0);
    c = fma(c, -t2, 1.0);
    s = t * fma(s, -t2, 1.0);
    return vec2<f32>(select(c, -c, folded), select(s, -s, signed_x < 0.0));
}

/// Row i's additive margins: (m2, cos m2, sin m2, m3), its own where the call has per-row
/// margins, else the uniform's.
fn additive_margins(i: u32) -> vec4<f32> {
    if (params.loss.per_row == 1u) {
        let m = row_margins[i];
        let cs = cos_sin(m.x);
        return vec4<f32>(m.x, cs.x, cs.y, m.y);
    }
    let l = params.loss;
    return vec4<f32>(l.angular_margin, l.cos_m2, l.sin_m2, l.margin);
}

/// The target's margin function for row i and its slope: (ψ(c), dψ/dc) with
/// ψ(c) = cos(m1·θ + m2) − m3, θ = acos(c), made monotonic as in the spec: ArcFace's
/// fallback c − m2·sin m2 where θ + m2 > π, SphereFace's (−1)^k·cos(m1θ) − 2k on
/// θ ∈ [kπ/m1, (k+1)π/m1]; or AdaFace's clipped form (`angle_clip`). With `easy_margin`,
/// (c, 1) where c ≤ 0. The slope is 1 with `straight_through`.
fn target_margin(c: f32, i: u32) -> vec2<f32> {
    let m = additive_margins(i);
    let angular = m.x;
    let cos_m2 = m.y;
    let sin_m2 = m.z;
    let margin = m.w;
    if (params.loss.easy_margin == 1u && c <= 0.0) {
        return vec2<f32>(c, 1.0);
    }
    if (params.loss.angle_clip == 1u) {
        let r = clipped_angle_margin(c, angular, cos_m2, sin_m2);
        return vec2<f32>(r.x - margin, select(r.y, 1.0, params.loss.straight_through == 1u));
    }
    if (params.loss.multiplicative_margin == 1u && angular == 0.0) {
        return vec2<f32>(c - margin, 1.0);
    }
    let cc = clamp(c, -1.0, 1.0);
    var psi: f32;
    var slope: f32;
    if (angular > 0.0) {
        // cos(θ + m2) = c·cos m2 − sin θ·sin m2, with sin θ from (1 − c)(1 + c).
        let sin_t = sqrt(max(0.0, (1.0 - cc) * (1.0 + cc)));
        if (cc > -cos_m2) {
            psi = cc * cos_m2 - sin_t * sin_m2;
            slope = cos_m2 + cc * sin_m2 / max(sin_t, SIN_GUARD);
        } else {
            psi = cc - angular * sin_m2;
            slope = 1.0;
        }
    } else {
        let m = params.loss.multiplicative_margin;
        // k only picks the branch; ψ is continuous where acos's rounding could move it.
        let k = min(floor(f32(m) * acos(cc) / PI), f32(m - 1u));
        let sign = select(1.0, -1.0, (u32(k) & 1u) == 1u);
        let cheb = chebyshev(m, cc);
        psi = sign * cheb.x - 2.0 * k;
        // (−1)^k·m·U_{m−1}(c) = m·|U_{m−1}(c)|, since U_{m−1}(c) = sin mθ / sin θ has the
        // sign (−1)^k on the k-th piece: no k, so a GPU's acos (accurate to about 1e-4
        // rad on some drivers) cannot flip the slope's sign next to a piece's end.
        slope = f32(m) * abs(cheb.y);
    }
    return vec2<f32>(psi - margin, select(slope, 1.0, params.loss.straight_through == 1u));
}

/// AdaFace's (cos θ', dcos θ'/dc), θ' = clip(acos(c') + m2, ε, π − ε) with
/// c' = clamp(c, −1 + ε, 1 − ε): cos(θ + m2) = c'·cos m2 − sin θ·sin m2 inside, cos ε or
/// −cos ε where the angle is clipped, and slope 0 where the clip or the clamp binds (as
/// their gradients are). acos only picks the branch: ψ is continuous across it.
fn clipped_angle_margin(c: f32, angular: f32, cos_m2: f32, sin_m2: f32) -> vec2<f32> {
    let cc = clamp(c, -1.0 + ANGLE_CLIP, 1.0 - ANGLE_CLIP);
    let angle = acos(cc) + angular;
    if (angle < ANGLE_CLIP) { return vec2<f32>(COS_ANGLE_CLIP, 0.0); }
    if (angle > PI - ANGLE_CLIP) { return vec2<f32>(-COS_ANGLE_CLIP, 0.0); }
    let sin_t = sqrt((1.0 - cc) * (1.0 + cc));
    let slope = select(cos_m2 + cc * sin_m2 / sin_t, 0.0, cc != c);
    return vec2<f32>(cc * cos_m2 - sin_t * sin_m2, slope);
}

/// Four non-target cosines of a row as its softmax sees them: zc = z/s, and dzc/dc.
struct OtherTerms {
    zc: vec4<f32>,
    slope: vec4<f32>,
}

/// Row i's non-target cosines c as the softmax sees them: CurricularFace's c·(t + c)
/// (slope t + 2c) above the row's φ_i, and 0 (slope 0) above the inter-class filter's
/// threshold (always below it without a filter); else c (slope 1).
fn other_terms(c: vec4<f32>, i: u32) -> OtherTerms {
    var terms = OtherTerms(c, vec4<f32>(1.0));
    if ((OTHER_TERMS & 2u) != 0u) {
        let t = params.loss.curricular_t;
        let hard = c > vec4<f32>(hard_thresholds[i]);
        terms.zc = select(c, c * (vec4<f32>(t) + c), hard);
        terms.slope = select(vec4<f32>(1.0), vec4<f32>(t) + 2.0 * c, hard);
    }
    if ((OTHER_TERMS & 1u) != 0u) {
        let dropped = c > vec4<f32>(params.loss.filter_threshold);
        terms.zc = select(terms.zc, vec4<f32>(), dropped);
        terms.slope = select(terms.slope, vec4<f32>(), dropped);
    }
    return terms;
}

/// G_ij = dL/dc_ij from the cosine c_ij, for row i with label y ≠ IGNORE, its softmax
/// results `row` and a global class j. The target's is −coef·(1 − p_iy)·dψ/dc, from the
/// forward pass's cancellation-free 1 − p_iy; the hard objective's touches only the
/// target and the best non-target class, where its hinge is active.
fn grad_logit(c: f32, i: u32, row: RowSoftmax, j: u32, y: u32, coef: f32) -> f32 {
    if (j == y) { return -coef * row.target_complement * target_margin(c, i).y; }
    if (params.loss.objective == 1u) {
        return select(0.0, coef * row.target_complement, j == row.best_other_class);
    }
    let terms = other_terms(vec4<f32>(c), i);
    let p = flush_subnormal(vec4<f32>(coef * exp(params.loss.scale * terms.zc.x - row.lse))).x;
    return p * terms.slope.x;
}

/// The (global) label of row i, or IGNORE if i is past B or the label is not a class.
fn label_of(i: u32) -> u32 {
    if (i >= params.batch) { return IGNORE; }
    let y = labels[i];
    return select(IGNORE, y, y < params.total_classes);
}
