// row_io.wgsl: bindings and helpers shared by the row losses (divergence, cross_entropy, hinton),
// prepended after common.wgsl. Binding 0 (the Params uniform) is declared by each shader.
//
// Rows of a chunk: the host may bind a window of the caller's buffers (offsets multiple of 64 rows)
// when the whole set is larger than max_storage_buffer_binding_size; `row` below is always relative
// to the window, and the count of valid rows (binding 4) is of the whole batch.

// The student and teacher are any dtype (Params' dtype_s, dtype_t: 0 f32, 1 bf16, 2 f16), read
// through load_s / load_t; 16-bit elements are packed two to a word (common.wgsl). The gradients
// the kernels write are f32: a bf16 or f16 gradient is written into an f32 scratch buffer and
// packed afterwards by pack.wgsl, so the in-place gradient here is always over an f32 student.
@group(0) @binding(1) var<storage, read_write> student: array<u32>; // read_write: in-place gradient
// The teacher and the labels are read only, but declared read_write: a framework's memory page
// can hold them beside the student and the gradients (burn's, `src/burn/wgpu.rs`), and wgpu
// refuses one buffer bound both read-only and read-write in one dispatch.
@group(0) @binding(2) var<storage, read_write> teacher: array<u32>;
@group(0) @binding(3) var<storage, read_write> labels: array<i32>;
@group(0) @binding(4) var<storage, read> valid_count: array<u32>;  // [0]: N_valid of the batch
@group(0) @binding(5) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(6) var<storage, read_write> grad_student: array<f32>;
@group(0) @binding(7) var<storage, read_write> grad_teacher: array<f32>;

const GRAD_NONE: u32 = 0u;
const GRAD_INTO: u32 = 1u;
const GRAD_IN_PLACE: u32 = 2u;

const REDUCTION_BATCHMEAN: u32 = 0u;

// Student element i (of the bound window) as f32.
fn load_s(i: u32) -> f32 {
    if (p.dtype_s == 0u) {
        return bitcast<f32>(student[i]);
    }
    return half_to_f32(student[i >> 1u] >> ((i & 1u) * 16u), p.dtype_s);
}

// Teacher element i (of the bound window) as f32.
fn load_t(i: u32) -> f32 {
    if (p.dtype_t == 0u) {
        return bitcast<f32>(teacher[i]);
    }
    return half_to_f32(teacher[i >> 1u] >> ((i & 1u) * 16u), p.dtype_t);
}

// Writes the student's gradient where the caller asked (a separate buffer, or over the logits).
// In place is safe: the lane that writes index i read student[i] earlier in the same pass and no
// other lane touches i.
fn write_grad_student(mode: u32, i: u32, v: f32) {
    if (mode == GRAD_INTO) {
        grad_student[i] = v;
    } else if (mode == GRAD_IN_PLACE) {
        student[i] = bitcast<u32>(v);
    }
}

// The factor of every gradient: g / N_valid for batchmean (0 when no row is valid), g otherwise.
fn gradient_scale(grad_scale: f32, reduction: u32) -> f32 {
    if (reduction == REDUCTION_BATCHMEAN) {
        let n = valid_count[0];
        return select(grad_scale / f32(n), 0.0, n == 0u);
    }
    return grad_scale;
}

// 0: valid, 1: masked (label == ignore_index), 2: invalid label (neither a class nor ignore_index).
fn label_state(has_labels: bool, row: u32, cols: u32, ignore_index: i32) -> u32 {
    if (!has_labels) {
        return 0u;
    }
    let y = labels[row];
    if (y == ignore_index) {
        return 1u;
    }
    if (y < 0 || u32(y) >= cols) {
        return 2u;
    }
    return 0u;
}

// Teacher value checks for probabilities / log-probabilities: NaN and +inf are bad; -inf is a
// legitimate log-probability of 0.
fn teacher_ok(form: u32, v: f32) -> bool {
    if (form == 2u && bitcast<u32>(v) == 0xff800000u) {
        return true;
    }
    return is_finite_f32(v);
}
