// pgjdbc through Topeng: run by tests/integration/test_clients_jdbc.py (one JVM per relay mode).
// Usage: java -cp DIR:postgresql.jar JdbcClient JDBC_URL USER PASSWORD
// Prints `key=value` lines; a failing step prints `key=ERROR sqlstate message` and carries on.
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.TreeSet;

public class JdbcClient {
    interface Step {
        String run() throws Exception;
    }

    static void step(String name, Step step) {
        String value;
        try {
            value = step.run();
        } catch (SQLException e) {
            value = "ERROR " + e.getSQLState() + " " + e.getMessage().split("\n")[0];
        } catch (Exception e) {
            value = "ERROR " + e;
        }
        System.out.println(name + "=" + value);
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("prepareThreshold", "1"); // server-side prepared statements at once
        try (Connection conn = DriverManager.getConnection(url, props)) {
            step("simple", () -> {
                try (Statement st = conn.createStatement();
                     ResultSet rs = st.executeQuery("SELECT count(*) FROM customers")) {
                    rs.next();
                    return Long.toString(rs.getLong(1));
                }
            });
            step("prepared", () -> {
                List<String> out = new ArrayList<>();
                try (PreparedStatement ps = conn.prepareStatement(
                        "SELECT id, length(nik) FROM customers WHERE id = ?")) {
                    for (int i = 1; i <= 5; i++) {
                        ps.setLong(1, i);
                        try (ResultSet rs = ps.executeQuery()) {
                            rs.next();
                            out.add(rs.getLong(1) + ":" + rs.getInt(2));
                        }
                    }
                }
                return String.join(",", out);
            });
            step("server_prepared", () -> {
                try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int + 1")) {
                    ps.setInt(1, 1);
                    ps.executeQuery().close();
                    ps.setInt(1, 2);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        boolean server = ps.unwrap(org.postgresql.PGStatement.class)
                                .isUseServerPrepare();
                        return rs.getInt(1) + " " + server;
                    }
                }
            });
            step("batch", () -> {
                try (Statement st = conn.createStatement()) {
                    st.execute("CREATE TEMP TABLE jdbc_batch (id int, name text)");
                }
                int total = 0;
                try (PreparedStatement ps = conn.prepareStatement(
                        "INSERT INTO jdbc_batch VALUES (?, ?)")) {
                    for (int i = 0; i < 200; i++) {
                        ps.setInt(1, i);
                        ps.setString(2, "row " + i);
                        ps.addBatch();
                    }
                    for (int n : ps.executeBatch()) {
                        total += n;
                    }
                }
                try (Statement st = conn.createStatement();
                     ResultSet rs = st.executeQuery("SELECT count(*), sum(id) FROM jdbc_batch")) {
                    rs.next();
                    return total + " " + rs.getLong(1) + " " + rs.getLong(2);
                }
            });
            step("transaction", () -> {
                conn.setAutoCommit(false);
                try (Statement st = conn.createStatement()) {
                    st.executeUpdate("INSERT INTO jdbc_batch VALUES (1000, 'rolled back')");
                    conn.rollback();
                    st.executeUpdate("INSERT INTO jdbc_batch VALUES (1001, 'committed')");
                    conn.commit();
                } finally {
                    conn.setAutoCommit(true);
                }
                try (Statement st = conn.createStatement();
                     ResultSet rs = st.executeQuery(
                             "SELECT string_agg(id::text, ',' ORDER BY id) FROM jdbc_batch"
                             + " WHERE id >= 1000")) {
                    rs.next();
                    return rs.getString(1);
                }
            });
            step("metadata", () -> {
                DatabaseMetaData md = conn.getMetaData();
                TreeSet<String> tables = new TreeSet<>();
                try (ResultSet rs = md.getTables(null, "bank", "%", new String[] {"TABLE"})) {
                    while (rs.next()) {
                        tables.add(rs.getString("TABLE_NAME"));
                    }
                }
                TreeSet<String> columns = new TreeSet<>();
                try (ResultSet rs = md.getColumns(null, "bank", "customers", "n%")) {
                    while (rs.next()) {
                        columns.add(rs.getString("COLUMN_NAME"));
                    }
                }
                return String.join(",", tables) + " " + String.join(",", columns) + " "
                        + md.getDatabaseProductName();
            });
            step("error", () -> {
                try (PreparedStatement ps = conn.prepareStatement("SELECT 1 / ?")) {
                    ps.setInt(1, 0);
                    ps.executeQuery();
                    return "no error";
                }
            });
            step("after_error", () -> {
                try (Statement st = conn.createStatement();
                     ResultSet rs = st.executeQuery("SELECT 'usable'")) {
                    rs.next();
                    return rs.getString(1);
                }
            });
        }
        step("wrong_password", () -> {
            Properties bad = new Properties();
            bad.setProperty("user", args[1]);
            bad.setProperty("password", "wrong");
            DriverManager.getConnection(url, bad).close();
            return "connected";
        });
    }
}
