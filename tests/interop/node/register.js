#!/usr/bin/env node
// Provision one device with the official Azure IoT Node.js provisioning device SDK, unmodified.
// Driven by tests/interop/test_node_sdk.py; usable by hand too.
//
//   node register.js --transport http|mqtt|mqtt-ws|amqp|amqp-ws --attestation symmetric|x509 \
//       --host HOST --id-scope SCOPE --registration-id ID \
//       (--key BASE64 | --cert CHAIN.pem --cert-key KEY.pem) [--payload JSON]
//
// Each option also reads an environment variable: DPS_TRANSPORT, DPS_ATTESTATION, DPS_HOST,
// DPS_ID_SCOPE, DPS_REGISTRATION_ID, DPS_SYMMETRIC_KEY, DPS_CERT_FILE, DPS_KEY_FILE, DPS_PAYLOAD.
// The SDK has no option for a trusted CA: set NODE_EXTRA_CA_CERTS=ca.pem. It always uses the
// standard ports (HTTPS and WebSockets 443, MQTT 8883, AMQP 5671).
//
// On success: the SDK's registration result as JSON on stdout, exit 0.
// On failure: {"name", "message", ...} as JSON on stdout, the same text on stderr, exit 1.
'use strict';

const fs = require('fs');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');

const OPTIONS = {
  transport: 'DPS_TRANSPORT',
  attestation: 'DPS_ATTESTATION',
  host: 'DPS_HOST',
  'id-scope': 'DPS_ID_SCOPE',
  'registration-id': 'DPS_REGISTRATION_ID',
  key: 'DPS_SYMMETRIC_KEY',
  cert: 'DPS_CERT_FILE',
  'cert-key': 'DPS_KEY_FILE',
  payload: 'DPS_PAYLOAD',
  timeout: 'DPS_TIMEOUT_SECONDS',
};

function usage(message) {
  process.stderr.write(`register.js: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const opts = {};
  for (const [name, env] of Object.entries(OPTIONS)) {
    if (process.env[env] !== undefined && process.env[env] !== '') opts[name] = process.env[env];
  }
  for (let i = 0; i < argv.length; i += 2) {
    const flag = argv[i];
    if (!flag.startsWith('--') || !(flag.slice(2) in OPTIONS)) usage(`unknown option ${flag}`);
    if (i + 1 >= argv.length) usage(`${flag} needs a value`);
    opts[flag.slice(2)] = argv[i + 1];
  }
  for (const name of ['transport', 'attestation', 'host', 'id-scope', 'registration-id']) {
    if (!opts[name]) usage(`--${name} is required`);
  }
  return opts;
}

function transportFor(name) {
  switch (name) {
    case 'http':
      return new (require('azure-iot-provisioning-device-http').Http)();
    case 'mqtt':
      return new (require('azure-iot-provisioning-device-mqtt').Mqtt)();
    case 'mqtt-ws':
      return new (require('azure-iot-provisioning-device-mqtt').MqttWs)();
    case 'amqp':
      return new (require('azure-iot-provisioning-device-amqp').Amqp)();
    case 'amqp-ws':
      return new (require('azure-iot-provisioning-device-amqp').AmqpWs)();
    default:
      return usage(`unknown transport ${name}`);
  }
}

function securityFor(opts) {
  const registrationId = opts['registration-id'];
  switch (opts.attestation) {
    case 'symmetric': {
      if (!opts.key) usage('--key is required for symmetric key attestation');
      const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
      return new SymmetricKeySecurityClient(registrationId, opts.key);
    }
    case 'x509': {
      if (!opts.cert || !opts['cert-key']) usage('--cert and --cert-key are required for x509');
      const { X509Security } = require('azure-iot-security-x509');
      // `cert` may hold the leaf followed by intermediates: Node's TLS sends them all.
      return new X509Security(registrationId, {
        cert: fs.readFileSync(opts.cert, 'utf8'),
        key: fs.readFileSync(opts['cert-key'], 'utf8'),
      });
    }
    default:
      return usage(`unknown attestation ${opts.attestation}`);
  }
}

// Everything the SDK's error objects carry that says why: their class, message, and the
// service's answer as each transport attaches it (HTTP: responseBody and the response status;
// MQTT: result, the parsed error body; AMQP: the rejection's AMQP error itself, a plain rhea
// object with condition, description and info instead of an Error).
function describeError(err) {
  const out = { name: (err && err.constructor && err.constructor.name) || typeof err };
  if (err && typeof err === 'object') {
    if (err.message !== undefined) out.message = err.message;
    if (err.condition !== undefined) {
      out.condition = String(err.condition);
      out.description = err.description;
      if (err.info !== undefined) out.info = err.info;
    }
    if (err.responseBody !== undefined) out.responseBody = String(err.responseBody);
    if (err.response && err.response.statusCode !== undefined) out.statusCode = err.response.statusCode;
    if (err.result !== undefined) out.result = err.result;
    if (err.transportError) out.transportError = describeError(err.transportError);
    if (err.amqpError) {
      out.amqpError = {
        condition: err.amqpError.condition,
        description: err.amqpError.description,
        info: err.amqpError.info,
      };
    }
    if (err.code !== undefined) out.code = err.code;
  } else {
    out.message = String(err);
  }
  return out;
}

function finish(code, obj) {
  let text;
  try {
    text = JSON.stringify(obj, null, 2);
  } catch (e) {
    text = JSON.stringify({ name: 'Error', message: String(obj) });
  }
  process.stdout.write(text + '\n', () => {
    if (code !== 0) process.stderr.write(text + '\n');
    process.exit(code);
  });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const timeoutSeconds = Number(opts.timeout || 45);
  const timer = setTimeout(() => {
    finish(1, { name: 'TimeoutError', message: `no registration result within ${timeoutSeconds} s` });
  }, timeoutSeconds * 1000);
  timer.unref();

  const client = ProvisioningDeviceClient.create(
    opts.host,
    opts['id-scope'],
    transportFor(opts.transport),
    securityFor(opts)
  );
  if (opts.payload) client.setProvisioningPayload(JSON.parse(opts.payload));
  try {
    const result = await client.register();
    clearTimeout(timer);
    finish(0, result);
  } catch (err) {
    clearTimeout(timer);
    finish(1, describeError(err));
  }
}

main().catch((err) => finish(1, describeError(err)));
