#!/usr/bin/env node
// One device on its IoT hub with the official Azure IoT Node.js device SDK (azure-iot-device with
// azure-iot-device-mqtt), unmodified, driven line by line. Driven by
// tests/interop/test_node_hub_device_sdk.py; usable by hand too.
//
//   HUB_TRANSPORT=mqtt|mqtt-ws HUB_HOST=hub.example HUB_DEVICE_ID=dev-1 HUB_GATEWAY=localhost \
//   (HUB_SYMMETRIC_KEY=BASE64 | HUB_CERT_FILE=cert.pem HUB_KEY_FILE=key.pem) \
//   HUB_METHODS=reboot,again NODE_EXTRA_CA_CERTS=ca.pem node hub_device.js
//
// HUB_GATEWAY is the host the SDK connects to when the hub's own name does not resolve: with a key
// it is the connection string's GatewayHostName; with a certificate it is the same field of the
// X509AuthenticationProvider's credentials (the SDK's connection string parser ignores it there).
// The SDK always uses the standard ports (MQTT 8883, WebSockets 443 at /$iothub/websocket).
//
// Commands, one JSON object a line on stdin, each answered on stdout by
// {"id", "ok": true, "result"} or {"id", "ok": false, "error": {"name", "message"}}:
//   {"id": 1, "op": "open"}                      client.open()
//   {"id": 2, "op": "send", "body": "...", "messageId": "...", "contentType": "...",
//    "contentEncoding": "...", "properties": {"k": "v"}}     client.sendEvent(message)
//   {"id": 3, "op": "getTwin"}                   client.getTwin(): the twin's properties
//   {"id": 4, "op": "patchReported", "patch": {}}  twin.properties.reported.update(patch)
//   {"id": 5, "op": "close"}                     client.close()
// Events, as they happen: {"event": "desired", "patch"} (the twin's 'properties.desired' event),
// {"event": "method", "name", "payload"} (answered 200 with {"echo": payload, "name"}),
// {"event": "c2d", "data", "messageId", "properties"} (then client.complete(message)).
'use strict';

const fs = require('fs');
const readline = require('readline');
const { Client, Message, X509AuthenticationProvider } = require('azure-iot-device');

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function env(name, required) {
  const value = process.env[name];
  if (required && !value) {
    process.stderr.write(`hub_device.js: set ${name}\n`);
    process.exit(2);
  }
  return value || undefined;
}

function transport(name) {
  switch (name) {
    case 'mqtt':
      return require('azure-iot-device-mqtt').Mqtt;
    case 'mqtt-ws':
      return require('azure-iot-device-mqtt').MqttWs;
    default:
      process.stderr.write(`hub_device.js: unknown transport ${name}\n`);
      process.exit(2);
  }
}

function makeClient() {
  const Transport = transport(env('HUB_TRANSPORT', true));
  const host = env('HUB_HOST', true);
  const deviceId = env('HUB_DEVICE_ID', true);
  const gateway = env('HUB_GATEWAY');
  const key = env('HUB_SYMMETRIC_KEY');
  if (key) {
    let cs = `HostName=${host};DeviceId=${deviceId};SharedAccessKey=${key}`;
    if (gateway) cs += `;GatewayHostName=${gateway}`;
    return Client.fromConnectionString(cs, Transport);
  }
  const x509 = {
    cert: fs.readFileSync(env('HUB_CERT_FILE', true)).toString(),
    key: fs.readFileSync(env('HUB_KEY_FILE', true)).toString(),
  };
  const provider = new X509AuthenticationProvider({ host, deviceId, gatewayHostName: gateway, x509 });
  return Client.fromAuthenticationProvider(provider, Transport);
}

const client = makeClient();
let twin = null;

client.on('error', (err) => out({ event: 'error', message: String(err && err.message) }));
client.on('disconnect', () => out({ event: 'disconnect' }));
client.on('message', (msg) => {
  const properties = {};
  for (const { key, value } of msg.properties.propertyList) properties[key] = value;
  out({ event: 'c2d', data: msg.data.toString(), messageId: msg.messageId, properties });
  client.complete(msg, () => {});
});
for (const name of (env('HUB_METHODS') || '').split(',').filter(Boolean)) {
  client.onDeviceMethod(name, (request, response) => {
    out({ event: 'method', name: request.methodName, payload: request.payload });
    response.send(200, { echo: request.payload, name: request.methodName }, () => {});
  });
}

async function getTwin() {
  const fresh = twin === null;
  twin = await client.getTwin();
  if (fresh) twin.on('properties.desired', (patch) => out({ event: 'desired', patch }));
  return twin.properties;
}

const ops = {
  open: () => client.open().then(() => null),
  close: () => client.close().then(() => null),
  send: async (cmd) => {
    const message = new Message(cmd.body);
    if (cmd.messageId) message.messageId = cmd.messageId;
    if (cmd.contentType) message.contentType = cmd.contentType;
    if (cmd.contentEncoding) message.contentEncoding = cmd.contentEncoding;
    for (const [k, v] of Object.entries(cmd.properties || {})) message.properties.add(k, v);
    await client.sendEvent(message);
    return null;
  },
  getTwin: async () => {
    const properties = await getTwin();
    return { desired: properties.desired, reported: properties.reported };
  },
  patchReported: async (cmd) => {
    if (twin === null) await getTwin();
    await new Promise((resolve, reject) =>
      twin.properties.reported.update(cmd.patch, (err) => (err ? reject(err) : resolve()))
    );
    return null;
  },
};

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (err) {
    out({ ok: false, error: { name: 'SyntaxError', message: String(err.message) } });
    return;
  }
  const op = ops[cmd.op];
  const run = op ? op(cmd) : Promise.reject(new Error(`unknown op ${cmd.op}`));
  run.then(
    (result) => out({ id: cmd.id, ok: true, result }),
    (err) => out({ id: cmd.id, ok: false, error: { name: err && err.constructor && err.constructor.name, message: String(err && err.message) } })
  );
});
lines.on('close', () => client.close().finally(() => process.exit(0)));
