#!/usr/bin/env node
// Create an individual enrollment and read it back with the official Azure IoT Node.js
// provisioning service SDK (azure-iot-provisioning-service), unmodified, from a service
// connection string. Driven by tests/interop/test_node_sdk.py; usable by hand too.
//
//   DPS_CONNECTION_STRING='HostName=...;SharedAccessKeyName=...;SharedAccessKey=...' \
//   DPS_REGISTRATION_ID=dev-1 NODE_EXTRA_CA_CERTS=ca.pem node service.js
//
// The SDK takes the connection string's whole HostName as the host name to connect to (port
// 443), as the C SDK does: a HostName with a port in it does not resolve.
//
// On success: the enrollment as the service returned it, JSON on stdout, exit 0.
// On failure: {"name", "message", "code"?, "responseBody"?} as JSON on stdout, exit 1.
'use strict';

const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');

function finish(code, obj) {
  process.stdout.write(JSON.stringify(obj, null, 2) + '\n', () => process.exit(code));
}

async function main() {
  const connectionString = process.env.DPS_CONNECTION_STRING;
  const registrationId = process.env.DPS_REGISTRATION_ID;
  if (!connectionString || !registrationId) {
    process.stderr.write('service.js: set DPS_CONNECTION_STRING and DPS_REGISTRATION_ID\n');
    process.exit(2);
  }
  const client = ProvisioningServiceClient.fromConnectionString(connectionString);
  await client.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: { type: 'symmetricKey' },
  });
  const got = await client.getIndividualEnrollment(registrationId);
  finish(0, got.responseBody);
}

main().catch((err) => {
  const out = { name: (err && err.constructor && err.constructor.name) || typeof err, message: String(err && err.message) };
  if (err && err.code !== undefined) out.code = err.code;
  if (err && err.responseBody !== undefined) out.responseBody = String(err.responseBody);
  finish(1, out);
});
