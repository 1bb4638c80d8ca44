// The kernel runner behind tests/kernels_emulated.rs: every kernels/*.cu compiled as C++ with
// the emulation in cuda_emu.hpp, driven over stdin/stdout by src/cuda/emulator.rs. It keeps
// buffers (its "device memory") and launches kernels by name; the Rust side runs the very
// same launch code it runs on a GPU.
//
// Protocol: little-endian binary; each request is an opcode byte and its fields, each reply
// starts with a u32 error length (0 = ok) followed by the error text, then any data.
//   'A' u32 id, u64 bytes              allocate (zeroed)
//   'F' u32 id                         free
//   'U' u64 addr, u64 len, bytes       upload
//   'D' u64 addr, u64 len              download -> bytes
//   'Z' u64 addr, u64 len              zero
//   'L' u16 name_len, name, u32 grid[3], u32 block[3], u32 params_len, params, u32 nptr,
//       u64 ptr[nptr]                  launch
//   'S'                                -> u32 len, text: "StructName size\n" per param struct
//   'K'                                -> u32 len, text: "kernel_name\n" per kernel
//   'Q'                                quit
// An address is (id << 40) | byte offset; 0 is the null pointer.

#define MEDCNN_EMULATE 1
#include "cuda_emu.hpp"

#include "../common.cuh"
#include "../adam.cu"
#include "../avg_pool2d.cu"
#include "../bias.cu"
#include "../conv2d.cu"
#include "../cross_entropy.cu"
#include "../dropout.cu"
#include "../gemm.cu"
#include "../max_pool2d.cu"
#include "../relu.cu"

// Deliberately wrong kernels, only in the emulator: tests/kernels_emulated.rs shows with them
// that the emulator catches each kind of bug (a wrong result without a barrier, a reported
// divergent barrier, an AddressSanitizer or ThreadSanitizer abort).
extern "C" __global__ void emu_probe_missing_sync(const ReluParams p, float* out) {
    __shared__ float s[1024];
    s[threadIdx.x] = (float)threadIdx.x + 1.0f;
    // A __syncthreads belongs here.
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
extern "C" __global__ void emu_probe_divergent_sync(const ReluParams p, float* out) {
    if (threadIdx.x % 2) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void emu_probe_out_of_bounds(const ReluParams p, float* out) { out[p.n + threadIdx.x] = 1.0f; }
// Not a broken kernel: common.cuh's grid-stride step at the top of the int range. Thread t
// starts where a huge grid would have put it, at p.n - 1 - t, and loops to p.n (INT_MAX in the
// test): each thread must run exactly once and stop, where `e += stride` would wrap to a
// negative e and keep going.
extern "C" __global__ void emu_probe_grid_end(const ReluParams p, float* out) {
    float count = 0.0f;
    for (int e = p.n - 1 - (int)threadIdx.x; e < p.n && count < 8.0f; e = grid_next(e)) count += 1.0f;
    out[threadIdx.x] = count;
}

#include <cstdio>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>

namespace {

struct Buffer {
    std::vector<unsigned char> bytes;
};
std::map<uint32_t, Buffer> buffers;

unsigned char* resolve(uint64_t addr, uint64_t len) {
    if (addr == 0) return nullptr;
    const uint32_t id = (uint32_t)(addr >> 40);
    const uint64_t off = addr & ((1ull << 40) - 1);
    auto it = buffers.find(id);
    if (it == buffers.end()) throw std::runtime_error("address of unknown buffer " + std::to_string(id));
    if (off + len > it->second.bytes.size())
        throw std::runtime_error("range [" + std::to_string(off) + ", +" + std::to_string(len) + ") outside buffer " +
                                 std::to_string(id) + " of " + std::to_string(it->second.bytes.size()) + " bytes");
    return it->second.bytes.data() + off;
}

using Runner = std::function<void(dim3, dim3, const std::string&, const std::vector<uint64_t>&)>;

template <class P, class... A, size_t... I>
void invoke(void (*kernel)(P, A...), const P& p, const std::vector<uint64_t>& ptrs, std::index_sequence<I...>,
            dim3 grid, dim3 block) {
    // Pointers are checked to lie in a buffer (not that the kernel stays inside it: build
    // with -fsanitize=address for that).
    void* args[sizeof...(A) + 1] = {resolve(ptrs[I], 0)..., nullptr};
    emu::launch(grid, block, [&] { kernel(p, static_cast<A>(args[I])...); });
}

template <class P, class... A>
Runner runner(void (*kernel)(P, A...)) {
    return [kernel](dim3 grid, dim3 block, const std::string& params, const std::vector<uint64_t>& ptrs) {
        if (params.size() != sizeof(P))
            throw std::runtime_error("parameter struct of " + std::to_string(params.size()) + " bytes, the kernel takes " +
                                     std::to_string(sizeof(P)));
        if (ptrs.size() != sizeof...(A))
            throw std::runtime_error(std::to_string(ptrs.size()) + " pointers, the kernel takes " +
                                     std::to_string(sizeof...(A)));
        P p;
        std::memcpy(&p, params.data(), sizeof(P));
        invoke(kernel, p, ptrs, std::index_sequence_for<A...>{}, grid, block);
    };
}

#define KERNEL(name) {#name, runner(name)}
const std::map<std::string, Runner> kernels = {
    KERNEL(adam_step),
    KERNEL(avg_pool_forward),
    KERNEL(avg_pool_backward),
    KERNEL(global_avg_pool_forward),
    KERNEL(global_avg_pool_backward),
    KERNEL(bias_add),
    KERNEL(bias_grad),
    KERNEL(im2col),
    KERNEL(col2im),
    KERNEL(cross_entropy_forward_backward),
    KERNEL(dropout_forward),
    KERNEL(dropout_backward),
    KERNEL(sgemm_nn_128), KERNEL(sgemm_nt_128), KERNEL(sgemm_tn_128), KERNEL(sgemm_tt_128),
    KERNEL(sgemm_nn_64), KERNEL(sgemm_nt_64), KERNEL(sgemm_tn_64), KERNEL(sgemm_tt_64),
    KERNEL(sgemm_nn_16), KERNEL(sgemm_nt_16), KERNEL(sgemm_tn_16), KERNEL(sgemm_tt_16),
    KERNEL(sgemm_reduce_splits),
    KERNEL(max_pool_forward),
    KERNEL(max_pool_backward),
    KERNEL(relu_forward),
    KERNEL(relu_backward),
    KERNEL(emu_probe_missing_sync),
    KERNEL(emu_probe_divergent_sync),
    KERNEL(emu_probe_out_of_bounds),
    KERNEL(emu_probe_grid_end),
};

#define SIZE(T) #T " " + std::to_string(sizeof(T)) + "\n"
std::string struct_sizes() {
    return std::string(SIZE(ConvParams)) + SIZE(GemmParams) + SIZE(SplitKParams) + SIZE(BiasAddParams) +
           SIZE(BiasGradParams) + SIZE(ReluParams) + SIZE(PoolParams) + SIZE(GlobalPoolParams) +
           SIZE(DropoutParams) + SIZE(CrossEntropyParams) + SIZE(AdamParams);
}

void read_exact(void* dst, size_t len) {
    if (len && std::fread(dst, 1, len, stdin) != len) throw std::runtime_error("eof");
}
template <class T>
T read() {
    T v;
    read_exact(&v, sizeof v);
    return v;
}
void write_exact(const void* src, size_t len) {
    if (len && std::fwrite(src, 1, len, stdout) != len) std::exit(3);
}
void reply(const std::string& error, const void* data = nullptr, size_t len = 0) {
    const uint32_t n = (uint32_t)error.size();
    write_exact(&n, 4);
    write_exact(error.data(), error.size());
    write_exact(data, len);
    std::fflush(stdout);
}
void reply_text(const std::string& text) {
    const uint32_t n = (uint32_t)text.size();
    reply("", &n, 4);
    write_exact(text.data(), text.size());
    std::fflush(stdout);
}

}  // namespace

int main() {
    for (;;) {
        int op = std::fgetc(stdin);
        if (op == EOF || op == 'Q') return 0;
        try {
            switch (op) {
                case 'A': {
                    const auto id = read<uint32_t>();
                    const auto bytes = read<uint64_t>();
                    buffers[id].bytes.assign(bytes, 0);
                    reply("");
                    break;
                }
                case 'F': {
                    buffers.erase(read<uint32_t>());
                    reply("");
                    break;
                }
                case 'U': {
                    const auto addr = read<uint64_t>();
                    const auto len = read<uint64_t>();
                    std::vector<unsigned char> data(len);
                    read_exact(data.data(), len);
                    std::memcpy(resolve(addr, len), data.data(), len);
                    reply("");
                    break;
                }
                case 'D': {
                    const auto addr = read<uint64_t>();
                    const auto len = read<uint64_t>();
                    reply("", resolve(addr, len), len);
                    break;
                }
                case 'Z': {
                    const auto addr = read<uint64_t>();
                    const auto len = read<uint64_t>();
                    std::memset(resolve(addr, len), 0, len);
                    reply("");
                    break;
                }
                case 'L': {
                    const auto name_len = read<uint16_t>();
                    std::string name(name_len, '\0');
                    read_exact(name.data(), name_len);
                    uint32_t g[3], b[3];
                    read_exact(g, sizeof g);
                    read_exact(b, sizeof b);
                    std::string params(read<uint32_t>(), '\0');
                    read_exact(params.data(), params.size());
                    std::vector<uint64_t> ptrs(read<uint32_t>());
                    read_exact(ptrs.data(), ptrs.size() * 8);
                    auto it = kernels.find(name);
                    if (it == kernels.end()) throw std::runtime_error("no kernel named " + name);
                    if (g[0] == 0 || g[1] == 0 || g[2] == 0 || b[0] * b[1] * b[2] == 0 || b[0] * b[1] * b[2] > 1024)
                        throw std::runtime_error("bad launch shape for " + name);
                    try {
                        it->second(dim3(g[0], g[1], g[2]), dim3(b[0], b[1], b[2]), params, ptrs);
                    } catch (const std::exception& e) {
                        throw std::runtime_error(name + ": " + e.what());
                    }
                    reply("");
                    break;
                }
                case 'S':
                    reply_text(struct_sizes());
                    break;
                case 'K': {
                    std::string names;
                    for (const auto& [name, _] : kernels) names += name + "\n";
                    reply_text(names);
                    break;
                }
                default:
                    std::fprintf(stderr, "harness: unknown opcode %d\n", op);
                    return 2;
            }
        } catch (const std::exception& e) {
            if (std::string(e.what()) == "eof") return 1;
            reply(e.what());
        }
    }
}
