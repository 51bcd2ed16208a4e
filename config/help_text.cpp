// The --help and --version texts: QSD's option syntax, blockd's own wording; any thread.
#include "config/help_text.h"

namespace blockd {

std::string help_text() {
  return R"(Usage: blockd [options]
blockd - a storage daemon that serves disk images, driven over QMP
(command-line and QMP compatible with qemu-storage-daemon)

  -h, --help             print this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         turn on trace points (-T help lists them)
  -V, --version          print the version and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         add a block node to the graph

  --chardev <options>    add a character device (socket, stdio, null)

  --daemonize            run in the background; the parent exits once
                         start-up has finished (or failed)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         serve a block node over NBD (needs --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         serve QMP on a character device

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start the NBD server

  --object help          list the object types blockd can create
  --object <type>,help   list the properties of one object type
  --object <type>[,<property>=<value>...]
                         create an object (the 'id' property is required);
                         properties are applied in the order given

  --pidfile <path>       write the process ID to <path> once start-up has
                         finished: its presence means blockd is ready

Options take effect one after the other, in the order given.
)";
}

std::string version_text() {
  return "blockd version " BLOCKD_VERSION " (compatible with qemu-storage-daemon 10.2.0)\n"
         "Free software; see the project's licence for copying conditions.\n";
}

}  // namespace blockd
