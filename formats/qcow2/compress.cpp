// zlib (raw deflate, 4 KiB window as QEMU uses) and zstd for qcow2 compressed clusters; any thread.
#include "formats/qcow2/compress.h"

#include <zlib.h>
#include <zstd.h>

namespace blockd::qcow2 {
namespace {
constexpr int window_bits = -12;  // raw deflate, no zlib header, 4 KiB window
}

result<void> decompress_cluster(compression type, const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  if (type == compression::zlib) {
    z_stream z{};
    if (inflateInit2(&z, window_bits) != Z_OK) return fail("zlib: cannot initialise the decompressor");
    z.next_in = const_cast<Bytef*>(in);
    z.avail_in = uInt(in_len);
    z.next_out = out;
    z.avail_out = uInt(out_len);
    int rc = inflate(&z, Z_FINISH);
    bool full = z.avail_out == 0;
    inflateEnd(&z);
    // The stream may end exactly at the cluster's end, or the output may fill before the decoder
    // sees the end marker; anything else is a damaged cluster.
    if ((rc == Z_STREAM_END || rc == Z_BUF_ERROR) && full) return {};
    return fail("compressed cluster does not decompress to a whole cluster (zlib)");
  }
  ZSTD_DCtx* d = ZSTD_createDCtx();
  if (!d) return fail("zstd: cannot create a decompression context");
  ZSTD_inBuffer ib{in, in_len, 0};
  ZSTD_outBuffer ob{out, out_len, 0};
  // Stream decoding: the input may carry trailing bytes of the last sector after the frame, and a
  // damaged frame must not write past the cluster.
  size_t rc = 1;
  while (ob.pos < ob.size && ib.pos < ib.size) {
    rc = ZSTD_decompressStream(d, &ob, &ib);
    if (ZSTD_isError(rc)) break;
    if (rc == 0) break;  // frame complete
  }
  ZSTD_freeDCtx(d);
  if (ZSTD_isError(rc) || ob.pos != ob.size) return fail("compressed cluster does not decompress to a whole cluster (zstd)");
  return {};
}

result<std::vector<uint8_t>> compress_cluster(compression type, const uint8_t* in, size_t len) {
  std::vector<uint8_t> out(len);
  if (type == compression::zlib) {
    z_stream z{};
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, window_bits, 9, Z_DEFAULT_STRATEGY) != Z_OK)
      return fail("zlib: cannot initialise the compressor");
    z.next_in = const_cast<Bytef*>(in);
    z.avail_in = uInt(len);
    z.next_out = out.data();
    z.avail_out = uInt(out.size() - 1);  // at least one byte smaller than the cluster
    int rc = deflate(&z, Z_FINISH);
    size_t n = out.size() - 1 - z.avail_out;
    deflateEnd(&z);
    if (rc != Z_STREAM_END) return std::vector<uint8_t>();  // would not shrink
    out.resize(n);
    return out;
  }
  size_t n = ZSTD_compress(out.data(), out.size() - 1, in, len, 1);
  if (ZSTD_isError(n)) return std::vector<uint8_t>();  // dstSize_tooSmall: would not shrink
  out.resize(n);
  return out;
}

}  // namespace blockd::qcow2
