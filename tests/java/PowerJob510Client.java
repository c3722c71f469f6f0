import java.io.IOException;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import okhttp3.FormBody;
import okhttp3.Headers;
import okhttp3.MediaType;
import okhttp3.OkHttpClient;
import okhttp3.Request;
import okhttp3.RequestBody;
import okhttp3.Response;
import okhttp3.ResponseBody;

/**
 * The PowerJob 5.1.0 client's request path (shared/POWERJOB.md sections 4 and 8), on the real OkHttp 3 library.
 *
 * <p>Written from reading the 5.1.0 classes, in their order: {@code PowerJobClient} (constructor and
 * {@code runJob}), {@code AppAuthClusterRequestService.request} (send; look the auth header up; on a miss fetch a
 * new token from /openApi/authApp and send the same request again), {@code ClusterRequestService.clusterHaRequest}
 * (current address, then the others, only on an IOException) and {@code ClusterRequestServiceOkHttp3Impl} (OkHttp
 * with 2 s connect/read/write/call timeouts, {@code FormBody} from a {@code HashMap}, and the response headers
 * copied into a {@code HashMap} under {@code Headers.names()}, i.e. the names as received, then read with a
 * plain, case-sensitive {@code Map.get}).
 *
 * <p>What differs from the real client, and why it does not matter here: fastjson and Jackson are not on the
 * machine, so the few JSON fields read (success, message, data.appId, data.token, data) are picked out with
 * regular expressions, and the /authApp body is written by hand in Jackson's field order; log lines go to stdout.
 *
 * <p>Usage: {@code java PowerJob510Client ADDRESS[,ADDRESS...] APP_NAME PASSWORD JOB_ID}. Prints the client's log
 * lines, then {@code RESULT success=<bool> data=<instanceId>}; exits 0 when runJob answered success=true.
 */
public final class PowerJob510Client {
    private static final String WEB_PATH = "/openApi";
    private static final String AUTH_APP = "/authApp";
    private static final String RUN_JOB = "/runJob";
    private static final String REQUEST_HEADER_APP_ID = "X-POWERJOB-APP-ID";
    private static final String REQUEST_HEADER_ACCESS_TOKEN = "X-POWERJOB-ACCESS-TOKEN";
    private static final String RESPONSE_HEADER_AUTH_STATUS = "X-POWERJOB-AUTH-PASSED";
    private static final String JSON_MEDIA_TYPE = "application/json; charset=utf-8";
    private static final int DEFAULT_TIMEOUT_SECONDS = 2;

    /** What the client throws: PowerJobException in the real one. */
    static final class PowerJobException extends RuntimeException {
        PowerJobException(String message) {
            super(message);
        }
    }

    /** {@code PowerRequestBody}: a payload (JSON text or form map) and a mutable header map. */
    static final class PowerRequestBody {
        final String json;
        final Map<String, String> form;
        final Map<String, String> headers = new HashMap<>();

        private PowerRequestBody(String json, Map<String, String> form) {
            this.json = json;
            this.form = form;
        }

        static PowerRequestBody json(String json) {
            return new PowerRequestBody(json, null);
        }

        static PowerRequestBody form(Map<String, String> form) {
            return new PowerRequestBody(null, form);
        }
    }

    /** {@code HttpResponse}: success = (code == 200), the body, and the header map. */
    static final class HttpResponse {
        int code;
        String response;
        Map<String, String> headers;

        boolean isSuccess() {
            return code == 200;
        }
    }

    private final OkHttpClient okHttpClient;
    private final List<String> addressList;
    private final String appName;
    private final String password;
    private String currentAddress;
    /** {@code AppAuthResult}: null until the first /authApp. */
    private String authAppId;
    private String authToken;
    private final Long appId;

    PowerJob510Client(List<String> addressList, String appName, String password) {
        this.addressList = addressList;
        this.appName = appName;
        this.password = password;
        this.currentAddress = addressList.get(0);
        this.okHttpClient = new OkHttpClient.Builder()
                .readTimeout(DEFAULT_TIMEOUT_SECONDS, TimeUnit.SECONDS)
                .writeTimeout(DEFAULT_TIMEOUT_SECONDS, TimeUnit.SECONDS)
                .connectTimeout(DEFAULT_TIMEOUT_SECONDS, TimeUnit.SECONDS)
                .callTimeout(DEFAULT_TIMEOUT_SECONDS, TimeUnit.SECONDS)
                .build();
        // PowerJobClient's constructor: the auth request goes through request(), so it is itself re-sent when
        // the auth header is missing, and the appId comes from its body.
        String body = request(AUTH_APP, PowerRequestBody.json(appAuthRequestJson()));
        if (!"true".equals(find(body, "\"success\"\\s*:\\s*(true|false)"))) {
            throw new PowerJobException(find(body, "\"message\"\\s*:\\s*\"((?:[^\"\\\\]|\\\\.)*)\""));
        }
        String id = find(body, "\"appId\"\\s*:\\s*(-?\\d+)");
        if (id == null) {
            throw new PowerJobException("appId is null, please check your config");
        }
        this.appId = Long.valueOf(id);
    }

    /** {@code PowerJobClient.runJob(jobId, instanceParams, delayMS)}; returns the body as the server sent it. */
    String runJob(long jobId, String instanceParams, long delayMs) {
        Map<String, String> param = new HashMap<>();
        param.put("jobId", String.valueOf(jobId));
        param.put("appId", appId.toString());
        param.put("delay", String.valueOf(delayMs));
        if (instanceParams != null && !instanceParams.isEmpty()) {
            param.put("instanceParams", instanceParams);
        }
        return request(RUN_JOB, PowerRequestBody.form(param));
    }

    /** {@code AppAuthClusterRequestService.request}: the path that sends a call twice. */
    String request(String path, PowerRequestBody body) {
        if (authToken == null) {
            refreshAppAuthResult();
        }
        HttpResponse httpResponse = doRequest(path, body);
        String authStatus = httpResponse.headers.get(RESPONSE_HEADER_AUTH_STATUS);
        if (Boolean.TRUE.toString().equalsIgnoreCase(authStatus)) {
            return httpResponse.response;
        }
        log("[PowerJobClient] auth failed[authStatus: " + authStatus + "], try to refresh the auth info");
        refreshAppAuthResult();
        httpResponse = doRequest(path, body);
        return httpResponse.response;
    }

    private HttpResponse doRequest(String path, PowerRequestBody body) {
        body.headers.put(REQUEST_HEADER_APP_ID, authAppId);
        body.headers.put(REQUEST_HEADER_ACCESS_TOKEN, authToken);
        HttpResponse httpResponse = clusterHaRequest(path, body);
        if (!httpResponse.isSuccess()) {
            throw new PowerJobException("REMOTE_SERVER_INNER_EXCEPTION");
        }
        return httpResponse;
    }

    private void refreshAppAuthResult() {
        HttpResponse httpResponse = clusterHaRequest(AUTH_APP, PowerRequestBody.json(appAuthRequestJson()));
        if (!httpResponse.isSuccess()) {
            throw new PowerJobException("AUTH_APP_EXCEPTION!");
        }
        String body = httpResponse.response;
        if (!"true".equals(find(body, "\"success\"\\s*:\\s*(true|false)"))) {
            throw new PowerJobException("AUTH_FAILED_" + find(body, "\"message\"\\s*:\\s*\"((?:[^\"\\\\]|\\\\.)*)\""));
        }
        log("[PowerJobClient] refresh auth info successfully!");
        authAppId = find(body, "\"appId\"\\s*:\\s*(-?\\d+)");
        authToken = find(body, "\"token\"\\s*:\\s*\"((?:[^\"\\\\]|\\\\.)*)\"");
    }

    /** {@code ClusterRequestService.clusterHaRequest}: only an IOException moves on to another address. */
    private HttpResponse clusterHaRequest(String path, PowerRequestBody body) {
        String url = "http://" + currentAddress + WEB_PATH + path;
        try {
            return sendHttpRequest(url, body);
        } catch (IOException e) {
            log("[ClusterRequestService] request url:" + url + " failed, reason is " + e + ".");
        }
        for (String addr : addressList) {
            if (addr.equals(currentAddress)) {
                continue;
            }
            url = "http://" + addr + WEB_PATH + path;
            try {
                HttpResponse res = sendHttpRequest(url, body);
                log("[ClusterRequestService] server change: from(" + currentAddress + ") -> to(" + addr + ").");
                currentAddress = addr;
                return res;
            } catch (IOException e) {
                log("[ClusterRequestService] request url:" + url + " failed, reason is " + e + ".");
            }
        }
        throw new PowerJobException("no server available when send post request");
    }

    /** {@code ClusterRequestServiceOkHttp3Impl.sendHttpRequest}. */
    private HttpResponse sendHttpRequest(String url, PowerRequestBody body) throws IOException {
        RequestBody requestBody;
        if (body.json != null) {
            requestBody = RequestBody.create(MediaType.parse(JSON_MEDIA_TYPE), body.json);
        } else {
            FormBody.Builder formBuilder = new FormBody.Builder();
            body.form.forEach(formBuilder::add);
            requestBody = formBuilder.build();
        }
        Request request = new Request.Builder()
                .post(requestBody)
                .headers(Headers.of(body.headers))
                .url(url)
                .build();
        try (Response response = okHttpClient.newCall(request).execute()) {
            HttpResponse httpResponse = new HttpResponse();
            httpResponse.code = response.code();
            ResponseBody responseBody = response.body();
            if (responseBody != null) {
                httpResponse.response = responseBody.string();
            }
            // The names as OkHttp received them; the map is then read with a case-sensitive get.
            Headers respHeaders = response.headers();
            Set<String> headerNames = respHeaders.names();
            Map<String, String> respHeaderMap = new HashMap<>();
            headerNames.forEach(hdKey -> respHeaderMap.put(hdKey, respHeaders.get(hdKey)));
            httpResponse.headers = respHeaderMap;
            return httpResponse;
        }
    }

    /** {@code AppAuthRequest} as Jackson (NON_NULL) writes it; {@code DigestUtils.md5} is null for "". */
    private String appAuthRequestJson() {
        StringBuilder json = new StringBuilder("{\"appName\":\"").append(escape(appName)).append('"');
        if (password != null && !password.isEmpty()) {
            json.append(",\"encryptedPassword\":\"").append(md5(password)).append('"');
        }
        return json.append(",\"encryptType\":\"md5\"}").toString();
    }

    private static String md5(String text) {
        try {
            byte[] digest = MessageDigest.getInstance("MD5").digest(text.getBytes(StandardCharsets.UTF_8));
            return String.format("%032x", new BigInteger(1, digest));
        } catch (java.security.NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    private static String escape(String text) {
        return text.replace("\\", "\\\\").replace("\"", "\\\"");
    }

    /** The first group of {@code regex} in {@code text}, or null. */
    private static String find(String text, String regex) {
        if (text == null) {
            return null;
        }
        Matcher matcher = Pattern.compile(regex).matcher(text);
        return matcher.find() ? matcher.group(1) : null;
    }

    private static void log(String line) {
        System.out.println(line);
    }

    public static void main(String[] args) {
        if (args.length != 4) {
            System.err.println("usage: PowerJob510Client ADDRESS[,ADDRESS...] APP_NAME PASSWORD JOB_ID");
            System.exit(64);
        }
        List<String> addresses = new ArrayList<>(Arrays.asList(args[0].split(",")));
        int status;
        try {
            PowerJob510Client client = new PowerJob510Client(addresses, args[1], args[2]);
            String body = client.runJob(Long.parseLong(args[3]), null, 0);
            String success = find(body, "\"success\"\\s*:\\s*(true|false)");
            System.out.println("RESULT success=" + success + " data=" + find(body, "\"data\"\\s*:\\s*(-?\\d+)"));
            status = "true".equals(success) ? 0 : 1;
        } catch (PowerJobException e) {
            System.out.println("EXCEPTION " + e.getMessage());
            status = 2;
        }
        // OkHttp's pool and dispatcher threads would keep the JVM alive for a minute.
        System.exit(status);
    }
}
