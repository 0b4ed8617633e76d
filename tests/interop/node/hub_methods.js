#!/usr/bin/env node
// Drive the official Azure IoT Node.js service SDK's direct methods (azure-iothub
// Client.invokeDeviceMethod), unmodified, against a built-in hub's REST API
// (POST /twins/{id}/methods). Driven by tests/interop/test_hub_service_methods.py; usable by hand.
//
//   node hub_methods.js --connection-string HUB_CS --device-id ID --offline-id ID2 --missing-id ID3
//
// The SDK connects to port 443 only: give connection.json's hubConnectionString of a server on
// 443 and set NODE_EXTRA_CA_CERTS=ca.pem. In order:
//   1. invokeDeviceMethod(ID, {methodName: 'echo', payload: {n: 1, s: 'two'}, responseTimeoutInSeconds: 10})
//      (the device, driven by the test, answers 200 with the request's payload)
//   2. invokeDeviceMethod(ID2, {methodName: 'echo'}) on a device that is not connected: an error
//   3. invokeDeviceMethod(ID3, {methodName: 'echo'}) on a device that does not exist: an error
//
// Prints {"result", "offline": {"name", "statusCode", "body"}, "missing": {...}} as JSON on
// stdout, exit 0; on an
// unexpected failure {"step", "name", "message"}, exit 1.
'use strict';

const { Client } = require('azure-iothub');

function parseArgs(argv) {
  const opts = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) {
      process.stderr.write(`hub_methods.js: bad argument ${argv[i]}\n`);
      process.exit(2);
    }
    opts[argv[i].slice(2)] = argv[i + 1];
  }
  for (const name of ['connection-string', 'device-id', 'offline-id', 'missing-id']) {
    if (!opts[name]) {
      process.stderr.write(`hub_methods.js: --${name} is required\n`);
      process.exit(2);
    }
  }
  return opts;
}

async function failure(client, deviceId) {
  try {
    await client.invokeDeviceMethod(deviceId, { methodName: 'echo', responseTimeoutInSeconds: 5 });
    return null;
  } catch (err) {
    return {
      name: err.constructor.name,
      statusCode: err.response ? err.response.statusCode : null,
      body: err.responseBody ? String(err.responseBody) : null,
    };
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const client = Client.fromConnectionString(opts['connection-string']);
  let step = 'invoke';
  try {
    const answer = await client.invokeDeviceMethod(opts['device-id'], {
      methodName: 'echo',
      payload: { n: 1, s: 'two' },
      responseTimeoutInSeconds: 10,
    });
    step = 'offline';
    const offline = await failure(client, opts['offline-id']);
    step = 'missing';
    const missing = await failure(client, opts['missing-id']);
    process.stdout.write(JSON.stringify({ result: answer.result, offline, missing }) + '\n');
  } catch (err) {
    process.stdout.write(JSON.stringify({ step, name: err.constructor.name, message: err.message }) + '\n');
    process.exitCode = 1;
  }
}

main();
