// The Socket.IO peer of `duplex bench`: a fan-out server written the way Socket.IO's docs
// broadcast to a group ("Rooms": join, then `io.to(room).emit`), per-message deflate off, the
// in-memory adapter of a single process. A client emits `subscribe` (acknowledged once it is in
// the room) to receive, and `publish` to send to everyone in a room.
// Prints `socket.io listening on http://127.0.0.1:PORT` once it listens (`--port 0`: any port).
import { createServer } from 'node:http';
import { Server } from 'socket.io';

const option = (name) => {
  const at = process.argv.indexOf(name);
  return at < 0 ? undefined : Number(process.argv[at + 1]);
};
const port = option('--port') || 0;
// `--ping-ms N`: ping every N ms and allow N ms for the pong (tests; the defaults otherwise).
const pingMs = option('--ping-ms');
const server = createServer();
const io = new Server(server, {
  perMessageDeflate: false,
  serveClient: false,
  ...(pingMs ? { pingInterval: pingMs, pingTimeout: pingMs } : {}),
});

io.on('connection', (socket) => {
  socket.on('subscribe', (room, ack) => {
    socket.join(room);
    if (typeof ack === 'function') ack();
  });
  socket.on('publish', (room, data) => {
    io.to(room).emit('message', data);
  });
});

server.listen(port, '127.0.0.1', () => {
  console.log(`socket.io listening on http://127.0.0.1:${server.address().port}`);
});
