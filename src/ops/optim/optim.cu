// One optimizer step per launch, one thread per parameter (CPU reference src/ops/optim/; the same
// math as optim.wgsl). Launch: 256 threads per block, ceil(len / 256) blocks (2D past
// 2^31-1). The bias corrections are computed on the host in f64 (AdamSpec::corrections):
// lr_c1 = lr / (1 - beta1^t), inv_c2 = 1 / (1 - beta2^t).

// Adam with L2 weight decay: g = grad + wd w, m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2,
// w -= lr_c1 m / (sqrt(v inv_c2) + eps).
extern "C" __global__ void adam_step(float* w, const float* grad, float* m, float* v, u64 len, float lr_c1,
                                     float inv_c2, float beta1, float beta2, float eps, float weight_decay) {
    const u64 i = block_linear() * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const float wi = w[i];
    const float g = grad[i] + weight_decay * wi;
    const float mi = beta1 * m[i] + (1.f - beta1) * g;
    const float vi = beta2 * v[i] + (1.f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    w[i] = wi - lr_c1 * mi / (sqrtf(vi * inv_c2) + eps);
}

// SGD with momentum (PyTorch's form): vel = mu vel + (grad + wd w), w -= lr vel.
extern "C" __global__ void sgd_step(float* w, const float* grad, float* velocity, u64 len, float lr, float momentum,
                                    float weight_decay) {
    const u64 i = block_linear() * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const float wi = w[i];
    const float g = grad[i] + weight_decay * wi;
    const float vel = momentum * velocity[i] + g;
    velocity[i] = vel;
    w[i] = wi - lr * vel;
}
