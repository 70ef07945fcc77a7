package channelgraph;

import java.nio.file.Path;
import java.util.concurrent.CountDownLatch;
import org.neo4j.configuration.GraphDatabaseInternalSettings;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.connectors.HttpConnector;
import org.neo4j.configuration.connectors.HttpsConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;
import org.neo4j.io.ByteUnit;
import org.neo4j.logging.Level;
import org.neo4j.logging.log4j.Log4jLogProvider;

/**
 * Runs Neo4j 5.26 Community embedded, reachable over Bolt on 127.0.0.1 only.
 *
 * <p>Usage: {@code Neo4jLauncher --data DIR [--port 7687] [--pagecache 512m]}. DIR is the Neo4j
 * home (databases under DIR/data, debug log under DIR/logs). Authentication is disabled, which is
 * acceptable only because every listener is bound to the loopback address. Prints one line
 * starting with "READY" once Bolt accepts connections; exits with status 2 on bad arguments and
 * 1 if the server cannot start. SIGTERM (or Ctrl-C) shuts the databases down cleanly.
 */
public final class Neo4jLauncher {
    private static final String HOST = "127.0.0.1";

    private Neo4jLauncher() {}

    public static void main(String[] args) throws InterruptedException {
        Path data = null;
        int port = 7687;
        String pagecache = "512m";
        try {
            for (int i = 0; i < args.length; i += 2) {
                String value = i + 1 < args.length ? args[i + 1] : null;
                if (value == null) throw new IllegalArgumentException("missing value for " + args[i]);
                switch (args[i]) {
                    case "--data" -> data = Path.of(value).toAbsolutePath();
                    case "--port" -> port = Integer.parseInt(value);
                    case "--pagecache" -> pagecache = value;
                    default -> throw new IllegalArgumentException("unknown option " + args[i]);
                }
            }
            if (data == null) throw new IllegalArgumentException("--data DIR is required");
            if (port < 1 || port > 65535) throw new IllegalArgumentException("bad port " + port);
        } catch (IllegalArgumentException e) {
            System.err.println("error: " + e.getMessage());
            System.err.println("usage: Neo4jLauncher --data DIR [--port 7687] [--pagecache 512m]");
            System.exit(2);
        }

        DatabaseManagementService dbms;
        try {
            dbms = new DatabaseManagementServiceBuilder(data)
                    .setUserLogProvider(new Log4jLogProvider(System.out, Level.INFO))
                    .setConfig(GraphDatabaseSettings.default_listen_address, new SocketAddress(HOST))
                    .setConfig(BoltConnector.enabled, true)
                    .setConfig(BoltConnector.listen_address, new SocketAddress(HOST, port))
                    .setConfig(BoltConnector.encryption_level, BoltConnector.EncryptionLevel.DISABLED)
                    .setConfig(BoltConnector.server_bolt_telemetry_enabled, false)
                    .setConfig(HttpConnector.enabled, false)
                    .setConfig(HttpsConnector.enabled, false)
                    .setConfig(GraphDatabaseSettings.auth_enabled, false)
                    .setConfig(GraphDatabaseSettings.udc_enabled, false)
                    .setConfig(GraphDatabaseSettings.pagecache_memory, ByteUnit.parse(pagecache))
                    // Default true reserves 256 MiB of disk per database's transaction log up front.
                    .setConfig(GraphDatabaseSettings.preallocate_logical_logs, false)
                    // Bolt's two Netty event-loop groups each idle 5 s on shutdown by default (~11 s stop).
                    .setConfig(GraphDatabaseInternalSettings.netty_server_shutdown_quiet_period, 1)
                    .build();
        } catch (RuntimeException e) {
            System.err.println("error: Neo4j failed to start: " + e);
            e.printStackTrace();
            System.exit(1);
            return;
        }

        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            System.out.println("STOPPING: shutting down Neo4j");
            System.out.flush();
            dbms.shutdown();
            System.out.println("STOPPED");
            System.out.flush();
            stopped.countDown();
        }, "neo4j-shutdown"));

        System.out.println("READY bolt://" + HOST + ":" + port + " home=" + data);
        System.out.flush();
        stopped.await();
    }
}
