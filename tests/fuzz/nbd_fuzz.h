// The NBD fuzz entry point (option haggling, then transmission request parsing) shared by the libFuzzer target and the regression replayer; one calling thread.
#pragma once
#include <cstddef>
#include <cstdint>

namespace blockd::fuzz {

// Input layout: [control byte][chop seed][client byte stream]. Inputs shorter than 2 bytes are
// all stream (control 0).
//
// control bits 0-1: the handshake's buffered_option_limit (64 KiB, 64, 4096, 16 bytes);
// bit 2: when the handshake does not reach transmission, parse the remainder as transmission
//        requests anyway, against export 0, in the mode of bits 3-4;
// bits 3-4: that mode (simple, structured, extended, extended);
// bits 5-7: how the stream is cut into reads (0: one read; 1: single bytes; 2..7: sizes up to
//           4, 17, 64, 512, 4096 bytes, or a mix), the sizes drawn from the chop seed.
// The chop seed's bit 7 runs the handshake with tls_required (a server with tls-creds): an
// acknowledged STARTTLS is followed by tls_started(), the rest of the stream standing for what the
// TLS session decrypts. Bits 4-6 pick the export for a forced transmission phase.
inline constexpr size_t nbd_control_bytes = 2;

enum nbd_control_bit : uint8_t {
  nbd_limit_lo = 1u << 0,
  nbd_limit_hi = 1u << 1,
  nbd_force_transmission = 1u << 2,
  nbd_mode_lo = 1u << 3,
  nbd_mode_hi = 1u << 4,
};
inline constexpr uint8_t nbd_seed_tls_required = 1u << 7;

// What one input did, for the replayer's summary.
struct nbd_outcome {
  int options = 0;    // option replies groups the server sent
  int state = 0;      // 0 negotiating, 1 transmission, 2 closed
  int requests = 0;   // transmission requests parsed
  int refused = 0;    // of which check_request refused
};

// Runs one input: the stream goes to a handshake over a test export catalog twice (one read, then
// cut into reads), the remainder to the transmission parser. Aborts (a finding) when a rule the
// harness checks breaks: the two runs differ, the server's bytes do not parse as well-formed
// replies to the client's options, the state goes back, a request check lets through what it must
// refuse, or an encoded reply's lengths disagree with its payload.
nbd_outcome nbd_fuzz_one(const uint8_t* data, size_t size);

}  // namespace blockd::fuzz
