// Constructors of the chardev backends, one per QSD backend family, for chardev::open; the chardev's iothread.
#pragma once
#include <memory>

#include "actors/chardev/chardev.h"

namespace blockd::chr {

using opened = result<std::shared_ptr<chardev>>;

opened open_null(const chardev_spec& s, const env& e);      // simple.cpp
opened open_file(const chardev_spec& s, const env& e);      // simple.cpp
opened open_pipe(const chardev_spec& s, const env& e);      // simple.cpp
opened open_serial(const chardev_spec& s, const env& e);    // simple.cpp
opened open_parallel(const chardev_spec& s, const env& e);  // simple.cpp
opened open_stdio(const chardev_spec& s, const env& e);     // simple.cpp
opened open_ringbuf(const chardev_spec& s, const env& e);   // simple.cpp (ringbuf and memory)
opened open_pty(const chardev_spec& s, const env& e);       // pty.cpp
opened open_socket(const chardev_spec& s, const env& e);    // socket.cpp
opened open_udp(const chardev_spec& s, const env& e);       // udp.cpp
opened open_mux(const chardev_spec& s, const env& e);       // mux.cpp
opened open_hub(const chardev_spec& s, const env& e);       // hub.cpp

// The ring of a ringbuf/memory chardev, for ringbuf-read/-write; null for other backends.
class ring_buffer;
ring_buffer* ring_of(chardev& c);

}  // namespace blockd::chr
