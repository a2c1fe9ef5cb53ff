// The Node `ws` peer of `duplex bench`: a fan-out server written the way ws's README
// broadcasts ("Server broadcast", to every other open client), per-message deflate off.
// A client that sends a text message is the publisher; every other client receives it.
// Prints `ws listening on http://127.0.0.1:PORT` once it listens (`--port 0`: any free port).
import { createServer } from 'node:http';
import { WebSocketServer, WebSocket } from 'ws';

const at = process.argv.indexOf('--port');
const port = at < 0 ? 0 : Number(process.argv[at + 1]);
const server = createServer((_request, response) => response.writeHead(404).end());
const wss = new WebSocketServer({ server, perMessageDeflate: false });

wss.on('connection', (ws) => {
  ws.on('error', console.error);
  ws.on('message', (data, isBinary) => {
    wss.clients.forEach((client) => {
      if (client !== ws && client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    });
  });
});

server.listen(port, '127.0.0.1', () => {
  console.log(`ws listening on http://127.0.0.1:${server.address().port}`);
});
