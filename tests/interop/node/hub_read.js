#!/usr/bin/env node
// Read identities and twins with the official Azure IoT Node.js service SDK's Registry
// (azure-iothub), unmodified: what provisiond's hub writer wrote into a hub. Driven by
// tests/interop/test_hub_writer_sdk.py.
//
//   node hub_read.js --connection-string HUB_CS --device-ids ID1,ID2,...
//
// The SDK connects to port 443 only: give a hub on 443 and set NODE_EXTRA_CA_CERTS=ca.pem.
// Prints {"devices": {ID: {"device": Device, "twin": Twin}}} on stdout, exit 0; on failure
// {"name", "message"}, exit 1.
'use strict';

const { Registry } = require('azure-iothub');

function option(name) {
  const at = process.argv.indexOf(`--${name}`);
  if (at < 0 || at + 1 >= process.argv.length) {
    process.stderr.write(`hub_read.js: --${name} is required\n`);
    process.exit(2);
  }
  return process.argv[at + 1];
}

async function main() {
  const registry = Registry.fromConnectionString(option('connection-string'));
  const devices = {};
  for (const id of option('device-ids').split(',')) {
    const device = (await registry.get(id)).responseBody;
    const twin = (await registry.getTwin(id)).responseBody;
    devices[id] = {
      device: { deviceId: device.deviceId, status: device.status, authentication: device.authentication },
      twin: { tags: twin.tags, desired: twin.properties.desired },
    };
  }
  return { devices };
}

main().then(
  (out) => { process.stdout.write(JSON.stringify(out)); process.exit(0); },
  (err) => { process.stdout.write(JSON.stringify({ name: err.name, message: err.message })); process.exit(1); },
);
