// A main server for the interoperability test (tests/interop/run), on Node's `https` or
// `http2` (MODE=https|http2): mutual TLS, the answers and log lines of server.go.
'use strict';
const fs = require('fs');

const mode = process.env.MODE;
const variant = process.env.VARIANT === '1';
const log = fs.openSync(process.env.LOG, 'a');
let answers = 0;

function answer(id, attempt) {
  const n = parseInt(id.replace(/^m-/, ''), 10);
  if (n % 20 === 0) return 400;
  if (n % 10 === 1 && attempt === 1) return 503;
  return 200;
}

function reply(res, status) {
  const body = status === 200 ? '{"ok":true}' : '{"detail":"' + 'x'.repeat(variant ? 200 * 1024 : 64) + '"}';
  const headers = { 'content-type': 'application/json' };
  // HTTP/2 has no Connection header; its answers have no chunked framing either.
  if (variant && mode === 'https' && ++answers % 7 === 0) headers.connection = 'close';
  if (!variant) headers['content-length'] = Buffer.byteLength(body);
  res.writeHead(status, headers);
  if (variant) {
    const half = body.length >> 1;
    res.write(body.slice(0, half));
    res.end(body.slice(half));
  } else {
    res.end(body);
  }
}

function handle(req, res) {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString());
    } catch (e) {
      res.writeHead(422);
      res.end('bad json');
      return;
    }
    const parts = req.url.split('/');
    if (req.method === 'POST' && req.url === '/internal/messages/deliver') {
      const status = answer(body.message_id, body.attempt);
      fs.writeSync(log, `deliver ${body.message_id} ${body.attempt} ${status}\n`);
      reply(res, status);
    } else if (req.method === 'PUT' && parts.length === 5 && parts[4] === 'status') {
      fs.writeSync(log, `status ${parts[3]} ${body.attempt_count} ${body.status}\n`);
      reply(res, 200);
    } else {
      res.writeHead(404);
      res.end();
    }
  });
}

const options = {
  key: fs.readFileSync(process.env.KEY),
  cert: fs.readFileSync(process.env.CERT),
  ca: fs.readFileSync(process.env.CA),
  requestCert: true,
  rejectUnauthorized: true,
};
const [host, port] = process.env.ADDR.split(':');
const server = mode === 'http2' ? require('http2').createSecureServer(options, handle) : require('https').createServer(options, handle);
server.listen(Number(port), host);
