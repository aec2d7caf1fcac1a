// Python bindings of the compiled core (iota._C). Tensors arrive as objects
// supporting the buffer protocol (numpy views of torch CPU tensors) or, for
// CUDA, as raw device pointers: nothing here links against libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "block_pool.h"
#include "codec_math.h"
#include "frame.h"
#include "plan.h"
#if defined(IOTA_WITH_CUDA)
#include "codec_cuda.h"
#endif

namespace py = pybind11;
using namespace iota;

namespace {

// A C-contiguous view of a Python buffer, released on scope exit.
struct Buffer {
  Py_buffer view{};
  Buffer(py::handle obj, bool writable, const char* what) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view, flags) != 0) {
      PyErr_Clear();
      throw CodecError(std::string(what) + " must be a C-contiguous" + (writable ? " writable" : "") +
                       " buffer (bytes, bytearray, memoryview or numpy array)");
    }
  }
  ~Buffer() { PyBuffer_Release(&view); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  uint8_t* data() const { return (uint8_t*)view.buf; }
  size_t size() const { return (size_t)view.len; }
};

size_t dtype_size(int dtype) { return dtype == DT_F32 ? 4 : 2; }

FrameSpec make_spec(int dtype, const std::vector<int64_t>& shape, int kind, int bits, int64_t block, int flags,
                    uint64_t seed) {
  FrameSpec s;
  if (dtype < 0 || dtype > DT_BF16) throw CodecError("unknown dtype code " + std::to_string(dtype));
  s.kind = (uint8_t)kind;
  s.bits = (uint8_t)bits;
  s.flags = (uint8_t)flags;
  s.dtype = (uint8_t)dtype;
  s.block = (uint32_t)block;
  s.seed = seed;
  s.numel = 1;
  for (int64_t d : shape) {
    if (d < 0) throw CodecError("negative dimension in shape");
    s.shape.push_back((uint64_t)d);
    s.numel = (d != 0 && s.numel > kMaxNumel / (uint64_t)d) ? kMaxNumel + 1 : s.numel * (uint64_t)d;
  }
  if (kind < 0 || kind > KIND_BF16 || bits < 0 || bits > 255 || block < 0 || block > UINT32_MAX || flags < 0 ||
      flags > 255)
    throw CodecError("codec spec field out of range");
  return s;
}

py::dict spec_dict(const FrameSpec& s, const FrameLayout& l) {
  py::dict d;
  d["kind"] = s.kind;
  d["bits"] = s.bits;
  d["flags"] = s.flags;
  d["dtype"] = s.dtype;
  d["block"] = s.block;
  d["seed"] = s.seed;
  d["numel"] = s.numel;
  d["shape"] = py::tuple(py::cast(s.shape));
  d["header_len"] = l.header;
  d["scales_off"] = l.scales_off;
  d["scales_len"] = l.scales_len;
  d["codes_off"] = l.codes_off;
  d["codes_len"] = l.codes_len;
  d["total"] = l.total;
  return d;
}

// A fresh multi-MB frame is mostly page faults the first time it is written;
// transparent huge pages cut their number 512-fold where the kernel allows it.
void advise_huge_pages(uint8_t* p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = 2u << 20;
  if (n < 2 * huge) return;
  uintptr_t begin = ((uintptr_t)p + huge - 1) & ~(huge - 1), end = ((uintptr_t)p + n) & ~(huge - 1);
  if (end > begin) madvise((void*)begin, end - begin, MADV_HUGEPAGE);  // advisory: failure is harmless
#else
  (void)p;
  (void)n;
#endif
}

// Checks src against the spec and writes a sealed frame into `frame` (l.total bytes).
void encode_to(const FrameSpec& s, const FrameLayout& l, const Buffer& in, uint8_t* frame, int threads) {
  if (in.size() != s.numel * dtype_size(s.dtype))
    throw CodecError("tensor data holds " + std::to_string(in.size()) + " bytes, expected " +
                     std::to_string(s.numel * dtype_size(s.dtype)));
  py::gil_scoped_release nogil;
  write_header(s, l, frame);
  encode_payload(s, l, in.data(), frame, threads);
  seal_frame(frame, l.total);
}

py::bytes encode(py::handle src, int dtype, const std::vector<int64_t>& shape, int kind, int bits, int64_t block,
                 int flags, uint64_t seed, int threads) {
  FrameSpec s = make_spec(dtype, shape, kind, bits, block, flags, seed);
  FrameLayout l = layout_for(s);
  Buffer in(src, false, "tensor data");
  PyObject* raw = PyBytes_FromStringAndSize(nullptr, (Py_ssize_t)l.total);
  if (!raw) throw py::error_already_set();
  py::bytes out = py::reinterpret_steal<py::bytes>(raw);
  uint8_t* frame = (uint8_t*)PyBytes_AS_STRING(raw);  // not shared yet: safe to fill
  advise_huge_pages(frame, l.total);
  encode_to(s, l, in, frame, threads);
  return out;
}

size_t encode_into(py::handle src, int dtype, const std::vector<int64_t>& shape, int kind, int bits, int64_t block,
                   int flags, uint64_t seed, py::handle out, int threads) {
  FrameSpec s = make_spec(dtype, shape, kind, bits, block, flags, seed);
  FrameLayout l = layout_for(s);
  Buffer in(src, false, "tensor data");
  Buffer o(out, true, "output buffer");
  if (o.size() < l.total)
    throw CodecError("output buffer holds " + std::to_string(o.size()) + " bytes; the frame needs " +
                     std::to_string(l.total));
  encode_to(s, l, in, o.data(), threads);
  return l.total;
}

py::dict parse(py::handle frame, bool verify_payload) {
  Buffer f(frame, false, "frame");
  FrameLayout l;
  FrameSpec s;
  {
    py::gil_scoped_release nogil;
    s = parse_frame(f.data(), f.size(), &l, verify_payload);
  }
  return spec_dict(s, l);
}

void decode_into(py::handle frame, py::handle out, int out_dtype, int threads, bool verify) {
  Buffer f(frame, false, "frame");
  Buffer o(out, true, "output");
  if (out_dtype < 0 || out_dtype > DT_BF16) throw CodecError("unknown output dtype code");
  py::gil_scoped_release nogil;
  FrameLayout l;
  FrameSpec s = parse_frame(f.data(), f.size(), &l, verify);
  if (o.size() != s.numel * dtype_size(out_dtype))
    throw CodecError("output holds " + std::to_string(o.size()) + " bytes; the frame decodes to " +
                     std::to_string(s.numel) + " elements");
  decode_payload(s, l, f.data(), o.data(), (uint8_t)out_dtype, nullptr, 0.0f, threads);
}

void decode_accumulate(py::handle frame, py::handle acc, float weight, int threads) {
  Buffer f(frame, false, "frame");
  Buffer a(acc, true, "accumulator");
  py::gil_scoped_release nogil;
  FrameLayout l;
  FrameSpec s = parse_frame(f.data(), f.size(), &l);
  if (a.size() != s.numel * 4)
    throw CodecError("accumulator holds " + std::to_string(a.size() / 4) + " fp32 values; the frame decodes to " +
                     std::to_string(s.numel));
  decode_payload(s, l, f.data(), nullptr, DT_F32, (float*)a.data(), weight, threads);
}

void decode_reduce(const std::vector<py::handle>& frames, const std::vector<float>& weights, py::handle acc,
                   py::handle gram, int threads, bool verify) {
  const size_t k = frames.size();
  if (weights.size() != k) throw CodecError(std::to_string(k) + " frames but " + std::to_string(weights.size()) + " weights");
  std::vector<std::unique_ptr<Buffer>> views;
  for (py::handle f : frames) views.push_back(std::make_unique<Buffer>(f, false, "frame"));
  Buffer a(acc, true, "accumulator");
  Buffer g(gram, true, "gram");
  if (g.size() != k * k * 8) throw CodecError("gram must hold " + std::to_string(k * k) + " float64 values");
  py::gil_scoped_release nogil;
  std::vector<FrameSpec> specs(k);
  std::vector<FrameLayout> layouts(k);
  std::vector<const uint8_t*> data(k);
  for (size_t i = 0; i < k; i++) {
    specs[i] = parse_frame(views[i]->data(), views[i]->size(), &layouts[i], verify);
    data[i] = views[i]->data();
    const FrameSpec &s = specs[i], &s0 = specs[0];
    if (s.kind != s0.kind || s.bits != s0.bits || s.block != s0.block || s.flags != s0.flags || s.numel != s0.numel ||
        s.dtype != s0.dtype)
      throw CodecError("frame " + std::to_string(i) + " is not encoded like frame 0 (kind, bits, block, flags, dtype, size)");
  }
  if (k > 0 && a.size() != specs[0].numel * 4)
    throw CodecError("accumulator holds " + std::to_string(a.size() / 4) + " fp32 values; the frames decode to " +
                     std::to_string(specs[0].numel));
  reduce_payloads(specs, layouts, data, weights.data(), (float*)a.data(), (double*)g.data(), threads);
}

py::dict frame_layout(int dtype, const std::vector<int64_t>& shape, int kind, int bits, int64_t block, int flags,
                      uint64_t seed) {
  FrameSpec s = make_spec(dtype, shape, kind, bits, block, flags, seed);
  FrameLayout l = layout_for(s);
  std::string header(l.header, '\0');
  write_header(s, l, (uint8_t*)header.data());
  py::dict d = spec_dict(s, l);
  d["header"] = py::bytes(header);
  return d;
}

void seal(py::handle frame) {
  Buffer f(frame, true, "frame");
  seal_frame(f.data(), f.size());
}

uint64_t checksum_of(py::handle data) {
  Buffer b(data, false, "data");
  py::gil_scoped_release nogil;
  return checksum(b.data(), b.size());
}

#if defined(IOTA_WITH_CUDA)
void check_cuda(int code, const char* what) {
  if (code != 0) throw CodecError(std::string("CUDA ") + what + " failed: " + iota::cuda::error_string(code));
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "iota's compiled core: codecs, wire frames, checksums, all-reduce chunking";
  {
    uint16_t probe = 1;
    if (*(uint8_t*)&probe != 1) throw std::runtime_error("iota frames need a little-endian host");
  }
  py::object errors = py::module_::import("iota.errors");
  static py::object frame_error = errors.attr("FrameError");
  static py::object codec_error = errors.attr("CodecError");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FrameError& e) {
      PyErr_SetString(frame_error.ptr(), e.what());
    } catch (const CodecError& e) {
      PyErr_SetString(codec_error.ptr(), e.what());
    }
  });

  m.def("encode", &encode, py::arg("src"), py::arg("dtype"), py::arg("shape"), py::arg("kind"), py::arg("bits"),
        py::arg("block"), py::arg("flags"), py::arg("seed"), py::arg("threads") = 0,
        "Encode a C-contiguous buffer of numel elements into a sealed frame (bytes).");
  m.def("encode_into", &encode_into, py::arg("src"), py::arg("dtype"), py::arg("shape"), py::arg("kind"),
        py::arg("bits"), py::arg("block"), py::arg("flags"), py::arg("seed"), py::arg("out"), py::arg("threads") = 0,
        "Encode into a writable buffer of at least the frame's size; returns the frame's length.");
  m.def("parse", &parse, py::arg("frame"), py::arg("verify_payload") = true,
        "Validate a frame (fields, lengths, then checksum and scales); return its header.");
  m.def("decode_into", &decode_into, py::arg("frame"), py::arg("out"), py::arg("out_dtype"), py::arg("threads") = 0,
        py::arg("verify") = true, "Decode into a writable buffer; verify=false skips the checksum, not the structure.");
  m.def("decode_accumulate", &decode_accumulate, py::arg("frame"), py::arg("acc"), py::arg("weight"),
        py::arg("threads") = 0, "acc (fp32) += weight * decoded, fused.");
  m.def("decode_reduce", &decode_reduce, py::arg("frames"), py::arg("weights"), py::arg("acc"), py::arg("gram"),
        py::arg("threads") = 0, py::arg("verify") = true,
        "acc (fp32) += weights[i] * decoded frames[i] in order, as repeated decode_accumulate; gram (float64 k x k) "
        "= the decoded frames' inner products. One decode per frame; verify=false skips the checksums (frames "
        "already checked).");
  m.def("frame_layout", &frame_layout, py::arg("dtype"), py::arg("shape"), py::arg("kind"), py::arg("bits"),
        py::arg("block"), py::arg("flags"), py::arg("seed"),
        "Header bytes and section offsets of a frame, for backends that fill scales and codes themselves.");
  m.def("seal", &seal, py::arg("frame"), "Write the checksum into the last 8 bytes of a writable frame.");
  m.def("checksum", &checksum_of, py::arg("data"), "XXH64 (seed 0) of a buffer.");
  py::class_<ByteBlock>(m, "ByteBlock", py::buffer_protocol(),
                        "A writable block of bytes from the process's block pool, given back when it is freed.")
      .def(py::init<size_t>(), py::arg("nbytes"))
      .def("__len__", &ByteBlock::size)
      .def_buffer([](ByteBlock& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1, {(py::ssize_t)b.size()},
                               {(py::ssize_t)1});
      });
  m.def(
      "block_pool_stats",
      [] {
        BlockPoolStats s = BlockPool::instance().stats();
        py::dict d;
        d["taken_bytes"] = s.taken_bytes;
        d["fresh_bytes"] = s.fresh_bytes;
        d["pooled_bytes"] = s.pooled_bytes;
        d["out_bytes"] = s.out_bytes;
        d["peak_bytes"] = s.peak_bytes;
        return d;
      },
      "Bytes the block pool handed out, mapped fresh, keeps free, has out in live blocks, and had out at most.");
  m.def("plan_shards", &plan_shards, py::arg("numel"), py::arg("block"), py::arg("weights"));
  m.def("plan_parts", &plan_parts, py::arg("begin"), py::arg("end"), py::arg("block"), py::arg("max_part"));
  m.def("isa", [] { return std::string(active_kernels().isa); }, "Instruction set of the CPU kernels in use.");
  m.def("isas", &available_isas, "Instruction sets this CPU can run.");
  m.def("set_isa", &select_isa, py::arg("name"), "Use another instruction set's kernels (for tests and benchmarks).");
  m.attr("max_block") = kMaxBlock;
#if defined(IOTA_WITH_CUDA)
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", [] { return iota::cuda::device_count(); });
  m.def(
      "cuda_encode",
      [](uintptr_t src, int dtype, int64_t numel, int bits, int64_t block, int flags, uint64_t seed, uintptr_t scales,
         uintptr_t codes, uintptr_t status, uintptr_t stream) {
        py::gil_scoped_release nogil;
        check_cuda(iota::cuda::encode((const void*)src, dtype, numel, bits, block, flags, seed, (void*)scales,
                                      (void*)codes, (int*)status, (void*)stream),
                   "encode");
      },
      "Encode device memory into device scales/codes sections (raw pointers).");
  m.def(
      "cuda_decode",
      [](uintptr_t scales, uintptr_t codes, int64_t numel, int bits, int64_t block, int flags, uintptr_t out,
         int out_dtype, uintptr_t acc, float weight, uintptr_t stream) {
        py::gil_scoped_release nogil;
        check_cuda(iota::cuda::decode((const void*)scales, (const void*)codes, numel, bits, block, flags, (void*)out,
                                      out_dtype, (float*)acc, weight, (void*)stream),
                   "decode");
      },
      "Decode device scales/codes into device memory, or accumulate into fp32 (raw pointers).");
#else
  m.attr("cuda_compiled") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
}
